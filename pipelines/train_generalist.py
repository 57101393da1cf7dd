"""Stage 1: train the generalist over all classes.

Usage: python -m pipelines.train_generalist CONFIG [key=value ...]   (same as `specialists train-generalist`)
"""

import sys

from specialists.cli import stage_main


def main(argv=None) -> int:
    return stage_main("train-generalist", argv)


if __name__ == "__main__":
    sys.exit(main())
