"""The ``specialists`` command, built from the stage table: one verb per stage, ``run`` for
all of them, ``predict`` for inference on files, ``export`` for ONNX graphs of a run, ``report``
for the run on one HTML page.

A user error (bad config, missing file, missing stage) prints one line and exits with 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import SpecialistsError


def _usage() -> str:
    from .stages import STAGES

    lines = ["usage:", "  specialists run CONFIG [key=value ...] [--force]    every stage, resumable"]
    for s in STAGES:
        extra = "".join(f" [--{o} ...]" for o in s.options)
        lines.append(f"  specialists {s.verb} CONFIG [key=value ...]{extra}    {s.help}")
    lines.append("  specialists predict RUN_DIR [FILE ...] [--text TEXT ...] [--model ensemble|student|generalist] [--explain]")
    lines.append("  specialists export RUN_DIR [--model student|generalist|ensemble] [--format onnx] [--out DIR]    "
                 "ONNX graphs + what serving needs, verified against PyTorch")
    lines.append("  specialists report RUN_DIR [--out FILE]    the run on one self-contained HTML page "
                 "(default RUN_DIR/report.html)")
    return "\n".join(lines)


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


OPTIONS = {  # the command-line options a stage row may name: (argparse help, parser of the value)
    "only": ("train only these specialist ids (e.g. 3 or 0,3)", parse_only),
}


def stage_parser(verb: str, options=()) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"specialists {verb}")
    p.add_argument("config", help="YAML config file (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. generalist.epochs=5")
    p.add_argument("--force", action="store_true",
                   help="rerun a stage whose recorded config differs, and everything after it")
    p.add_argument("-v", "--verbose", action="store_true")
    for name in options:
        p.add_argument(f"--{name}", help=OPTIONS[name][0])
    return p


def stage_main(verb: str, argv: list[str] | None = None) -> int:
    """Entry point shared by the pipeline scripts and the CLI verbs (``run`` or a stage's verb)."""
    from .stages import BY_VERB

    stage = BY_VERB.get(verb)
    args = stage_parser(verb, stage.options if stage else ()).parse_intermixed_args(argv)
    setup_logging(args.verbose)
    return _guard(lambda: _run_verb(stage, args))


def _run_verb(stage, args) -> int:
    from .device import close_distributed, init_distributed, is_main
    from .reports.page import write_page
    from .reports.render import run_summary
    from .rundir import Run, load_config
    from .stages.pipeline import run_all, run_stage

    cfg = load_config(args.config, args.overrides)
    if init_distributed(cfg.device, cfg.launch.dist_timeout) and not is_main():  # under torchrun: rank 0 speaks for all
        logging.getLogger("specialists").setLevel(logging.WARNING)
    if stage is None:  # `run`
        run_all(cfg, force=args.force)
        try:  # on every rank: the write itself is rank 0's (rundir.io.rank0)
            page = write_page(Run(cfg))
        except SpecialistsError as exc:  # the stages are done: a page it cannot write is a warning
            logging.getLogger("specialists").warning("the run's page was not written: %s", exc)
            page = None
        if is_main():
            print(run_summary(Run(cfg)))
            if page is not None:
                print(f"\nThe run on one page: {page}")
        close_distributed()
        return 0
    options = {name: OPTIONS[name][1](getattr(args, name)) for name in stage.options
               if getattr(args, name) is not None}
    run_stage(cfg, stage.key, force=args.force, **options)
    close_distributed()
    return 0


def _guard(fn) -> int:
    try:
        return fn() or 0
    except SpecialistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a read-only folder, a full disk, a permission: the system's word, one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


def predict_main(argv: list[str] | None = None) -> int:
    from .device import DEVICES
    from .inference.predict import MODELS, predict_files

    p = argparse.ArgumentParser(prog="specialists predict", description="classify image or .npy files, or texts")
    p.add_argument("run_dir")
    p.add_argument("files", nargs="*", help="image or .npy files; for a text run .txt (a text per line) or .jsonl")
    p.add_argument("--text", action="append", default=[], help="a text to classify (a text run; repeatable)")
    p.add_argument("--model", choices=MODELS, default="ensemble")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--explain", action="store_true",
                   help="with a soft-tree student (--model student): print the path of decisions")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the run's files against the sizes and sha256 recorded when they were written")
    args = p.parse_args(argv)
    if not args.files and not args.text:
        p.error("give FILE(s) or --text")
    setup_logging()

    def go():
        return predict_files(args.run_dir, args.files, model=args.model, top_k=args.top_k, device=args.device,
                             verify=not args.no_verify, explain=args.explain, texts=args.text)

    return _guard(go)


def export_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="specialists export",
                                description="export a run's model(s) to ONNX, verified against PyTorch")
    p.add_argument("run_dir")
    # --model and --format are checked by export_run, so a bad value is one line like any bad input
    p.add_argument("--model", default="student", help="student (default; the generalist if there is no student), "
                   "generalist, or ensemble (the generalist, every specialist and ensemble.json)")
    p.add_argument("--format", default="onnx", help="onnx (the only one)")
    p.add_argument("--out", help="output folder (default RUN_DIR/export)")
    args = p.parse_args(argv)
    setup_logging()

    def go():
        from .inference.export import export_run

        export_run(args.run_dir, model=args.model, fmt=args.format, out=args.out, echo=print)

    return _guard(go)


def report_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="specialists report",
                                description="write a run's results on one self-contained HTML page")
    p.add_argument("run_dir")
    p.add_argument("--out", help="the HTML file to write (default RUN_DIR/report.html)")
    args = p.parse_args(argv)
    setup_logging()

    def go():
        from .reports.page import write_page

        print(f"wrote {write_page(args.run_dir, args.out)}")

    return _guard(go)


def main(argv: list[str] | None = None) -> int:
    from .stages import BY_VERB

    argv = list(sys.argv[1:] if argv is None else argv)
    verbs = ["run", *BY_VERB, "predict", "export", "report"]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in verbs:
        print(_usage(), file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command '{argv[0]}' (one of: {', '.join(verbs)})", file=sys.stderr)
            return 2
        return 0
    verb, rest = argv[0], argv[1:]
    if verb == "predict":
        return predict_main(rest)
    if verb == "export":
        return export_main(rest)
    if verb == "report":
        return report_main(rest)
    return stage_main(verb, rest)


if __name__ == "__main__":
    raise SystemExit(main())
