"""Stage 4: evaluate generalist vs ensemble (Table 4, significance, calibration, cost).

Usage: python -m pipelines.evaluate CONFIG [key=value ...]   (same as `specialists evaluate`)
"""

import sys

from specialists.cli import stage_main


def main(argv=None) -> int:
    return stage_main("evaluate", argv)


if __name__ == "__main__":
    sys.exit(main())
