"""The ``specialists`` command: one verb per stage, ``run`` for all of them, ``predict``.

    specialists run CONFIG [key=value ...] [--force]
    specialists train-generalist | find-subsets | evaluate | ablate | distill CONFIG [key=value ...]
    specialists train-specialists CONFIG [key=value ...] [--only 0,3]
    specialists predict RUN_DIR FILE [FILE ...] [--model ensemble|student|generalist]

A user error (bad config, missing file, missing stage) prints one line and exits with 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import SpecialistsError

STAGE_VERBS = {
    "train-generalist": "generalist",
    "find-subsets": "subsets",
    "train-specialists": "specialists",
    "evaluate": "evaluate",
    "ablate": "ablate",
    "distill": "student",
}


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="[%(name)s] %(message)s",
                        stream=sys.stderr, force=True)
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every probed CPU build


def parse_only(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        ids = [int(t) for t in text.split(",") if t.strip() != ""]
    except ValueError:
        raise SpecialistsError(f"--only expects specialist ids like 3 or 0,3, got '{text}'") from None
    if not ids or min(ids) < 0:
        raise SpecialistsError(f"--only expects non-negative specialist ids, got '{text}'")
    return sorted(set(ids))


def stage_parser(verb: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"specialists {verb}")
    p.add_argument("config", help="YAML config file (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. generalist.epochs=5")
    p.add_argument("--force", action="store_true",
                   help="rerun a stage whose recorded config differs, and everything after it")
    p.add_argument("-v", "--verbose", action="store_true")
    if verb == "train-specialists":
        p.add_argument("--only", help="train only these specialist ids (e.g. 3 or 0,3)")
    return p


def stage_main(verb: str, argv: list[str] | None = None) -> int:
    """Entry point shared by the pipeline scripts and the CLI verbs."""
    from .config import load_config
    from .pipeline import run_all, run_stage

    args = stage_parser(verb).parse_intermixed_args(argv)
    setup_logging(args.verbose)
    return _guard(lambda: _run_stage_verb(verb, args, load_config, run_all, run_stage))


def _run_stage_verb(verb, args, load_config, run_all, run_stage):
    cfg = load_config(args.config, args.overrides)
    if verb == "run":
        run_all(cfg, force=args.force)
        print(run_summary(cfg.run_dir))
    else:
        options = {}
        if verb == "train-specialists" and args.only is not None:
            options["only"] = parse_only(args.only)
        run_stage(cfg, STAGE_VERBS[verb], force=args.force, **options)
    return 0


def run_summary(run_dir) -> str:
    """What ``specialists run`` prints last: the evaluation table with the controls, and
    where every report and plot of the run is."""
    from pathlib import Path

    from .controls import control_rows
    from .evaluation import print_summary
    from .io import read_json

    run_dir = Path(run_dir)
    path = run_dir / "evaluation" / "evaluation.json"
    if not path.exists():
        return f"no evaluation in {run_dir} yet"
    ev = read_json(path)
    shown = set(ev.get("plots", []))
    reports = sorted(str(p) for p in run_dir.glob("*/*") if p.suffix in (".md", ".png")
                     and str(p.relative_to(run_dir)) not in shown)
    return "\n".join([print_summary(ev, run_dir, control_rows(run_dir)), "", "Reports:"] + [f"  {p}" for p in reports])


def _guard(fn) -> int:
    try:
        return fn() or 0
    except SpecialistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


def predict_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="specialists predict", description="classify image or .npy files")
    p.add_argument("run_dir")
    p.add_argument("files", nargs="+")
    p.add_argument("--model", choices=("ensemble", "student", "generalist"), default="ensemble")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = p.parse_args(argv)
    setup_logging()

    def go():
        from .predict import predict_files

        return predict_files(args.run_dir, args.files, model=args.model, top_k=args.top_k, device=args.device)

    return _guard(go)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbs = ["run", *STAGE_VERBS, "predict"]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in verbs:
        print(__doc__.strip(), file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command '{argv[0]}' (one of: {', '.join(verbs)})", file=sys.stderr)
            return 2
        return 0
    verb, rest = argv[0], argv[1:]
    if verb == "predict":
        return predict_main(rest)
    return stage_main(verb, rest)


if __name__ == "__main__":
    raise SystemExit(main())
