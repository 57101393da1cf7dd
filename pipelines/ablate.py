"""Stage 5: the ablation over the number of specialists, with the compute-matched control.

Usage: python -m pipelines.ablate CONFIG [key=value ...]   (same as `specialists ablate`)
"""

import sys

from specialists.cli import stage_main


def main(argv=None) -> int:
    return stage_main("ablate", argv)


if __name__ == "__main__":
    sys.exit(main())
