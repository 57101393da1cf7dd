"""Stage 2: cluster the generalist's confusions into class subsets.

Usage: python -m pipelines.find_subsets CONFIG [key=value ...]   (same as `specialists find-subsets`)
"""

import sys

from specialists.cli import stage_main


def main(argv=None) -> int:
    return stage_main("find-subsets", argv)


if __name__ == "__main__":
    sys.exit(main())
