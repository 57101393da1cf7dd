"""Stage 6: distil the ensemble into one student (and its controls).

Usage: python -m pipelines.distill CONFIG [key=value ...]   (same as `specialists distill`)
"""

import sys

from specialists.cli import stage_main


def main(argv=None) -> int:
    return stage_main("distill", argv)


if __name__ == "__main__":
    sys.exit(main())
