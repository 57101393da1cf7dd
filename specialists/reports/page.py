"""``RUN_DIR/report.html``: a whole run on one self-contained page, rendered from the run directory.

``specialists run`` writes it after its last stage; ``specialists report RUN_DIR [--out FILE]``
writes it on demand. Like every report it is read from disk (the JSON, markdown and PNG
artifacts), never from memory, so it can be rendered at any time, from any copy of the run.

The page has one ``<section>`` per part of the run that exists, and none for a part that does
not (a stage not finished, a run without ablation, student or export)::

    config       config.yaml (the resolved config) and data.json (the data summary)
    generalist   its metrics and curves.png                      (stage generalist done)
    subsets      the subsets with class names, covariance.png    (stage subsets done)
    specialists  each specialist's metrics; with the evaluation its routed accuracy and
                 specialists.png                                 (stage specialists done)
    evaluation   evaluation.md (headline, Table 4, routing, time) and by_coverage.png (evaluate)
    ablation     ablation.md and ablation.png                    (stage ablate done)
    controls     what the same compute buys otherwise            (a control trained)
    frontier     accuracy against inference cost, frontier.png   (frontier.json written)
    student      student.md, and a soft tree's tree.png and tree_path.png (stage student done)
    export       each `specialists export` JSON in RUN_DIR/export: its files, checked against
                 the sha256 the JSON records, and its verification against PyTorch

Self-contained: the PNGs are embedded as ``data:`` URIs, the style is inline, there is no
script, and a Content-Security-Policy forbids the page any request but ``data:`` images. The
markdown reports are reused: a small converter turns their headings, paragraphs and tables
(with ``**bold**`` and ```code```) into blocks the Jinja2 template renders, autoescaped, so
no text of the run is ever read as HTML.
"""

from __future__ import annotations

import base64
import re
from datetime import datetime, timezone
from pathlib import Path

import jinja2

from ..errors import SpecialistsError
from ..rundir import Run
from ..rundir.io import file_sha256, read_json, write_text
from . import frontier as frontier_report
from .controls import control_rows, controls_table
from .format import num, pct

TEMPLATES = Path(__file__).with_name("templates")
TEMPLATE = "report.html.j2"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The "format" of every JSON `specialists export` writes (specialists.inference.onnx_runtime.FORMAT,
# spelled again here: reports and inference are independent layers)
EXPORT_FORMAT = "specialists-onnx"
# Stage keys (the stage table in specialists.stages, which reports may not import) -> section ids
STAGE_SECTIONS = {"generalist": "generalist", "subsets": "subsets", "specialists": "specialists",
                  "evaluate": "evaluation", "ablate": "ablation", "student": "student"}
# evaluation.md's sections shown in other sections of the page (matched by the start of their title;
# one renamed stays in the evaluation section: shown twice, never lost)
ELSEWHERE = ("Controls", "Accuracy and cost", "Per specialist", "Plots")
PER_SPECIALIST = "Per specialist"
CONTROLS = "Controls"

_INLINE = re.compile(r"\*\*(.+?)\*\*|`([^`]+)`")
_IMAGE = re.compile(r"^!\[[^\]]*\]\([^)]*\)$")  # a markdown image line: the page embeds the PNGs itself


# --------------------------------------------------------------------------- markdown -> blocks
# A block is a dict the template renders: {"kind": "heading" | "p" | "table" | "figure" | "pre" | "note", ...};
# text is a list of spans (style, text), style "" | "b" | "code".
def spans(text: str) -> list[tuple[str, str]]:
    """``text`` with its ``**bold**`` and ```code``` as ``[(style, text), ...]``."""
    out, at = [], 0
    for m in _INLINE.finditer(text):
        if m.start() > at:
            out.append(("", text[at:m.start()]))
        out.append(("b", m.group(1)) if m.group(1) is not None else ("code", m.group(2)))
        at = m.end()
    if at < len(text):
        out.append(("", text[at:]))
    return out


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _align(cell: str) -> str:
    c = cell.strip()
    if c.startswith(":") and c.endswith(":"):
        return "center"
    return "right" if c.endswith(":") else "left"


def table_block(lines: list[str]) -> dict:
    """A markdown table (a header row, the ``|---:|`` row, the body rows) as a block."""
    head, rule, body = _cells(lines[0]), _cells(lines[1]), [_cells(line) for line in lines[2:]]
    return {"kind": "table", "head": [spans(c) for c in head], "align": [_align(c) for c in rule],
            "rows": [[spans(c) for c in row] for row in body]}


def plain_table(head: list[str], rows: list[list], align: list[str] | None = None) -> dict:
    """A table block of plain text cells (numbers right-aligned unless ``align`` says otherwise)."""
    align = align or ["left"] + ["right"] * (len(head) - 1)
    return {"kind": "table", "head": [[("", h)] for h in head], "align": align,
            "rows": [[[("", str(c))] for c in row] for row in rows]}


def paragraph(text: str) -> dict:
    return {"kind": "p", "spans": spans(text)}


def markdown_blocks(text: str) -> list[tuple[str, list[dict]]]:
    """The reports' markdown as ``[(section title, blocks), ...]``: one entry per ``## `` section
    (the first, titled ``""``, is what precedes any), its heading the first block. The ``# ``
    title and image lines are dropped (the page has its own titles, and embeds the PNGs)."""
    chunks: list[tuple[str, list[dict]]] = [("", [])]
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if not line or line.startswith("# ") or _IMAGE.match(line):
            i += 1
        elif line.startswith("#"):
            title = line.lstrip("#").strip()
            chunks.append((title, [{"kind": "heading", "spans": spans(title)}]))
            i += 1
        elif line.startswith("|") and i + 1 < len(lines) and set(lines[i + 1].strip()) <= set("|-: "):
            j = i + 2
            while j < len(lines) and lines[j].strip().startswith("|"):
                j += 1
            chunks[-1][1].append(table_block([s.strip() for s in lines[i:j]]))
            i = j
        else:  # a paragraph: the lines up to a blank line, a heading or a table
            j = i + 1
            while j < len(lines) and lines[j].strip() and not lines[j].strip().startswith(("#", "|", "![")):
                j += 1
            chunks[-1][1].append(paragraph(" ".join(s.strip() for s in lines[i:j])))
            i = j
    return [(title, blocks) for title, blocks in chunks if blocks]


def _markdown_file(path: Path, skip: tuple[str, ...] = (), only: tuple[str, ...] = ()) -> list[dict]:
    """The blocks of markdown report ``path`` (none when it is not there): its sections but those
    whose title starts with one of ``skip``, or (``only``) just those whose title starts with one of them."""
    if not path.is_file():
        return []
    out = []
    for title, blocks in markdown_blocks(path.read_text()):
        if (only and not (title and title.startswith(only))) or (title and skip and title.startswith(skip)):
            continue
        out += blocks
    return out


# --------------------------------------------------------------------------- pieces from disk
def figure(path: Path, caption: str) -> dict | None:
    """PNG ``path`` as a figure block with a ``data:`` URI (None when it is not there; a note
    when it is not a PNG)."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        return {"kind": "note", "spans": [("code", path.name), ("", ": not a PNG file, not shown")]}
    return {"kind": "figure", "src": "data:image/png;base64," + base64.b64encode(data).decode("ascii"),
            "caption": caption, "alt": caption}


def _json(path: Path):
    """The JSON at ``path``, or None when it is not there (a damaged one is one line)."""
    return read_json(path) if path.is_file() else None


def _names(names: list[str], limit: int = 12) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        if any(isinstance(x, str) for x in v):
            return _names(v, 200)
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return str(v)


def _shape(shape: list) -> str:
    """A graph's tensor shape, its dynamic batch axis (null in the JSON) as N: ``(N, 3, 32, 32)``."""
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"


def _when(t) -> str:
    return "-" if t is None else datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _config_section(run: Run) -> list[dict]:
    blocks = [{"kind": "heading", "spans": [("", "Data")]}]
    info = _json(run.data_json)
    rows = [["data set", run.cfg.data.name]] + ([["path", run.cfg.data.path]] if run.cfg.data.path else [])
    for key, v in (info or {}).items():
        if key != "tokenizer":  # a text run's tokenizer is its own file; data.json names it
            rows.append([key.replace("_", " "), _value(v)])
    blocks.append(plain_table(["", "data.json"], rows, ["left", "left"]))
    blocks.append({"kind": "heading", "spans": [("", "Config (config.yaml, resolved)")]})
    path = run.config_yaml
    blocks.append({"kind": "pre", "text": path.read_text() if path.is_file() else "(no config.yaml)"})
    return blocks


def _generalist_section(run: Run) -> list[dict]:
    m = _json(run.generalist.metrics) or {}
    rows = [[split, pct(m.get(f"{split}_top1")), pct(m.get(f"{split}_top5")), num(m.get(f"{split}_nll"))]
            for split in ("val", "test") if f"{split}_top1" in m]
    blocks = [paragraph(f"`{run.cfg.model.name}` on `{run.cfg.data.name}`: {m.get('epochs', '-')} epochs, "
                        f"{m.get('train_examples', '-')} training examples, {m.get('steps', '-')} steps, "
                        f"{num(m.get('seconds'), '.1f')} s.")]
    if rows:
        blocks.append(plain_table(["split", "top-1", "top-5", "NLL (nats)"], rows))
    return blocks + [figure(run.generalist.curves, "the generalist's loss and accuracy per epoch")]


def _subsets_section(run: Run) -> list[dict]:
    m = _json(run.subsets_metrics) or {}
    subsets = (_json(run.subsets_json) or {}).get("subsets", [])
    ari = m.get("adjusted_rand_index")
    blocks = [paragraph(f"{len(subsets)} subsets ({m.get('mode', '-')}, {m.get('normalize', '-')} of the generalist's "
                        f"probabilities on the {m.get('split', '-')} split, clustered with {m.get('method', '-')}); "
                        f"{m.get('classes_covered', '-')} classes covered, {m.get('classes_left_to_generalist', '-')} "
                        "left to the generalist"
                        + (f"; adjusted Rand index against the coarse labels {ari:.3f}." if ari is not None else "."))]
    blocks += [paragraph(f"warning: {w}") for w in m.get("warnings", [])]
    rows = [[s["id"], s["size"], _names(s.get("names") or [str(c) for c in s["classes"]], 30), s.get("n_examples", "-"),
             num(s.get("confusion_mass")), pct(s.get("subset_top1"))] for s in subsets]
    blocks.append(plain_table(["id", "size", "classes", "examples", "confusion mass", "generalist top-1 on them"],
                              rows, ["right", "right", "left", "right", "right", "right"]))
    return blocks + [figure(run.covariance_png, "the normalized covariance, the subsets as blocks")]


def _specialists_section(run: Run, evaluated: bool) -> list[dict]:
    names = {s["id"]: s.get("names") or [] for s in (_json(run.subsets_json) or {}).get("subsets", [])}
    rows = []
    for path in run.specialist_metrics_files:
        m = read_json(path)
        rows.append([m["id"], _names(names.get(m["id"], []), 8), m.get("train_examples_in_subset", "-"),
                     m.get("steps", "-"), num(m.get("seconds"), ".1f"), pct(m.get("subset_top1")),
                     pct(m.get("generalist_subset_top1")), pct(m.get("dustbin_precision")), pct(m.get("dustbin_recall"))])
    blocks = [paragraph("Each specialist's own test: on the test examples of its classes, restricted to its classes "
                        "(its `metrics.json`)."),
              plain_table(["id", "classes", "training examples in subset", "steps", "seconds", "subset top-1",
                           "generalist's subset top-1", "dustbin precision", "dustbin recall"], rows,
                          ["right", "left"] + ["right"] * 7)]
    if evaluated:
        blocks += _markdown_file(run.evaluation_md, only=(PER_SPECIALIST,))
        blocks.append(figure(run.evaluation_plots[1], "each specialist: routed examples, and accuracy on them"))
    return blocks


def _controls_section(run: Run) -> list[dict]:
    ev, controls = _json(run.evaluation_json), control_rows(run)
    if not ev or not controls:
        return []
    rows = controls_table(ev["generalist"]["top1"], ev["ensemble"]["top1"], controls)
    return [paragraph("Specialists cost training compute: every control trained so far, beside the generalist and "
                      "the ensemble."), table_block(rows)]


def _frontier_section(run: Run) -> list[dict]:
    fr = _json(run.frontier_json)
    if not fr or not fr.get("models"):
        return []
    blocks = [paragraph("Every model of the run so far, by inference FLOPs per example; training compute in generalist "
                        "training examples. Pareto: no other model is at least as accurate for no more FLOPs."),
              table_block(frontier_report.table(fr))]
    sentence = frontier_report.best_control_sentence(fr)
    if sentence:
        blocks.append(paragraph(sentence))
    return blocks + [figure(run.frontier_png, "accuracy against inference cost, the Pareto front")]


def _export_section(run: Run) -> list[dict]:
    folder = run.export_dir
    blocks = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            meta = read_json(path)
        except SpecialistsError:  # not JSON: not an export's (the folder may hold other files)
            continue
        if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
            continue
        ex, ver = meta.get("exporter", {}), meta.get("verification", {})
        blocks.append({"kind": "heading", "spans": [("code", path.name), ("", f": the {meta.get('model')}")]})
        blocks.append(paragraph(f"Exported by specialists {ex.get('specialists', '-')} with torch {ex.get('torch', '-')}, "
                                f"onnx {ex.get('onnx', '-')}, opset {ex.get('opset', '-')}; input `{meta['input']['name']}` "
                                f"{_shape(meta['input']['shape'])}, output `{meta['output']['name']}` "
                                f"{_shape(meta['output']['shape'])} (N: the batch)."))
        files = []
        tokenizer = (meta.get("preprocessing") or {}).get("tokenizer")  # a text export's, byte for byte
        for entry in [meta.get("graph"), meta.get("trunk"), meta.get("generalist"), *meta.get("specialists", []),
                      tokenizer if isinstance(tokenizer, dict) else None]:
            if entry:
                files += [entry] + list(entry.get("external_data", []))
        rows = []
        for f in files:
            p = folder / f["file"]
            state = ("missing" if not p.is_file() else
                     "matches" if file_sha256(p) == f["sha256"] else "changed since the export")
            rows.append([f["file"], p.stat().st_size if p.is_file() else "-", f["sha256"][:16], state])
        blocks.append(plain_table(["file", "bytes", "sha256 (recorded)", "on disk"], rows,
                                  ["left", "right", "left", "left"]))
        tol, diffs = ver.get("tolerance"), ver.get("max_abs_diff", {})
        blocks.append(paragraph(f"Verified on {ver.get('rows', '-')} test examples: the largest |onnxruntime - PyTorch| "
                                f"per graph, at most {tol:g}." if tol is not None else "No verification recorded."))
        blocks.append(plain_table(["graph", "largest |difference|", "within tolerance"],
                                  [[k, f"{d:.2e}", "yes" if tol is not None and d <= tol else "no"]
                                   for k, d in diffs.items()], ["left", "right", "left"]))
    return blocks


# --------------------------------------------------------------------------- the page
def _open(source) -> Run:
    if isinstance(source, Run):
        return source
    return Run.open(source, device="cpu", verify=False)


def page_context(source) -> dict:
    """What the template renders: the run's header and its sections, each
    ``{"id", "title", "stage", "blocks"}`` (sections without content left out)."""
    run = _open(source)
    stages = run.manifest.read()["stages"]
    done = {k for k, rec in stages.items() if rec.get("status") == "done"}
    if not done:
        raise SpecialistsError(f"{run.dir} has no finished stage yet, nothing to report: run `specialists run CONFIG` "
                               "(or a stage's command) first")
    sections = [("config", "Config and data", None, _config_section(run))]
    if "generalist" in done:
        sections.append(("generalist", "Generalist", "generalist", _generalist_section(run)))
    if "subsets" in done:
        sections.append(("subsets", "Subsets of confusable classes", "subsets", _subsets_section(run)))
    if "specialists" in done:
        sections.append(("specialists", "Specialists", "specialists", _specialists_section(run, "evaluate" in done)))
    if "evaluate" in done:
        blocks = _markdown_file(run.evaluation_md, skip=ELSEWHERE)
        sections.append(("evaluation", "Evaluation: generalist vs generalist + specialists", "evaluate",
                         blocks + [figure(run.evaluation_plots[0], "Table 4: accuracy by the number of specialists "
                                                                   "covering the true class")]))
    if "ablate" in done:
        sections.append(("ablation", "Ablation over the number of specialists", "ablate",
                         _markdown_file(run.ablation_md, skip=(CONTROLS,))
                         + [figure(run.ablation_png, "top-1 against the number of specialists")]))
    if "evaluate" in done:
        sections.append(("controls", "Controls: what the same compute buys otherwise", None, _controls_section(run)))
        sections.append(("frontier", "Accuracy and cost", None, _frontier_section(run)))
    if "student" in done:
        sections.append(("student", "Student: the ensemble distilled into one model", "student",
                         _markdown_file(run.student_md) + [figure(run.tree_png, "the soft tree: every filter, and "
                                                                                "the leaves' top classes"),
                                                           figure(run.tree_path_png, "one test example's path")]))
    sections.append(("export", "Export (ONNX)", None, _export_section(run)))
    stage_rows = [[k, rec.get("status", "-"), _stage_time(rec.get("seconds")), _when(rec.get("finished"))]
                  for k, rec in stages.items()]
    return {
        "title": f"specialists run {run.dir.resolve().name}",
        "run_dir": str(run.dir.resolve()),
        "stages": plain_table(["stage", "status", "time", "finished"], stage_rows, ["left", "left", "right", "left"]),
        "sections": [{"id": i, "title": t, "stage": s, "blocks": [b for b in blocks if b]}
                     for i, t, s, blocks in sections if any(blocks)],
    }


def _stage_time(s) -> str:
    """A stage's time: seconds, or minutes from 100 s on (``format.seconds`` is per example)."""
    if s is None:
        return "-"
    return f"{s:.1f} s" if s < 100 else f"{s / 60:.1f} min"


def render_page(source) -> str:
    """The page of a run (a :class:`Run`, or a run directory's path) as HTML text."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template(TEMPLATE).render(**page_context(source))


def write_page(source, out=None) -> Path:
    """Render the page of a run and write it, atomically, to ``out`` (default
    ``RUN_DIR/report.html``). Returns its path. Not a run directory, a run with no finished
    stage, ``out`` a folder: one line each."""
    run = _open(source)
    path = Path(out) if out is not None else run.report_html
    if path.is_dir():
        raise SpecialistsError(f"--out {path} is a folder: give a file name (e.g. {path / 'report.html'})")
    return write_text(path, render_page(run))


__all__ = ["markdown_blocks", "page_context", "render_page", "write_page"]
