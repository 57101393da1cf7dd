"""Stage 3: train one specialist per subset (--only fans them out).

Usage: python -m pipelines.train_specialists CONFIG [key=value ...]   (same as `specialists train-specialists`)
"""

import sys

from specialists.cli import stage_main


def main(argv=None) -> int:
    return stage_main("train-specialists", argv)


if __name__ == "__main__":
    sys.exit(main())
