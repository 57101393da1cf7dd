"""Every stage in order, skipping what is complete.

Usage: python -m pipelines.run CONFIG [key=value ...]   (same as `specialists run`)
"""

import sys

from specialists.cli import stage_main


def main(argv=None) -> int:
    return stage_main("run", argv)


if __name__ == "__main__":
    sys.exit(main())
