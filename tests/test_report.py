"""``specialists report``: the run on one self-contained HTML page (specialists.reports.page).

The page is parsed with the standard library's ``html.parser`` and checked against the run's
own files: one section per finished stage and none for the others, every image a ``data:``
PNG, nothing fetched from the network, the run's figures on the page, run text escaped. The
tiny run here has three stages; tests/test_quickstart.py checks the page ``specialists run``
writes for a whole run (evaluation, ablation, controls, frontier, student) with :func:`check_page`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import error_line_within, tiny_config

from specialists.cli import main
from specialists.reports.page import markdown_blocks, render_page
from specialists.rundir import Run

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny problems, one thread

PNG = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """Sections (id -> their text), every <img> src, every src/href, every element name."""

    def __init__(self, html: str):
        super().__init__()
        self.sections: dict[str, str] = {}
        self.images: list[str] = []
        self.links: list[str] = []
        self.tags: set[str] = set()
        self._in: str | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if self._in:
            self.sections[self._in] += " "  # table cells apart
        if tag == "section":
            self._in = a["id"]
            self.sections[self._in] = ""
        if tag == "img":
            self.images.append(a.get("src", ""))
        self.links += [v for k, v in attrs if k in ("src", "href") and v is not None]

    def handle_endtag(self, tag):
        if tag == "section":
            self._in = None

    def handle_data(self, data):
        if self._in:
            self.sections[self._in] += data


def check_page(path: Path, sections: list[str]) -> Page:
    """Parse the page at ``path`` (in ``RUN_DIR/``), check it has exactly ``sections`` in order,
    every image a ``data:`` PNG and the run's PNGs all of them, byte for byte, and nothing to
    fetch (no src or href but ``data:`` URIs and links inside the page). Returns the page
    (tests/test_quickstart.py checks a whole run's page with it)."""
    page = Page(path.read_text())
    assert list(page.sections) == sections
    decoded = []
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        decoded.append(base64.b64decode(src.split(",", 1)[1], validate=True))
    assert all(b.startswith(PNG) for b in decoded)
    assert sorted(decoded) == sorted(p.read_bytes() for p in path.parent.glob("*/*.png"))
    assert page.links and all(v.startswith(("data:", "#")) for v in page.links)
    return page


def _copy(src, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("manifest.lock"))
    return dst


def test_page_has_a_section_per_finished_stage_and_embeds_the_pngs(tiny_run, tmp_path, capsys):
    d = _copy(tiny_run.run_dir, tmp_path)
    # run text is text: a class name holding HTML must come out escaped, not as elements
    path = d / "subsets" / "subsets.json"
    subsets = json.loads(path.read_text())
    subsets["subsets"][0]["names"][0] = "<script>alert(1)</script><img src=http://x.org/y.png>"
    path.write_text(json.dumps(subsets))
    assert main(["report", str(d)]) == 0
    assert capsys.readouterr().out == f"wrote {d / 'report.html'}\n"

    # finished: generalist, subsets, specialists; no evaluation, ablation, controls, student, export
    page = check_page(d / "report.html", ["config", "generalist", "subsets", "specialists"])
    assert len(page.images) == 2  # curves.png, covariance.png
    assert "script" not in page.tags and "<script>alert(1)</script><img" in page.sections["subsets"]
    for s in subsets["subsets"]:  # the subsets by class name
        assert ", ".join(s["names"]) in page.sections["subsets"]
    top1 = json.loads((d / "generalist" / "metrics.json").read_text())["test_top1"]
    assert f"{100 * top1:.2f}%" in page.sections["generalist"]  # as the reports write percentages
    assert "seed: 0" in page.sections["config"]  # the resolved config


def test_a_stage_not_finished_has_no_section(tiny_run, tmp_path):
    d = _copy(tiny_run.run_dir, tmp_path)
    Run.open(d, device="cpu", verify=False).manifest.drop(["specialists"], [d / "specialists"])
    (d / "page.html").write_text(render_page(d))
    check_page(d / "page.html", ["config", "generalist", "subsets"])
    # a stage attempted but not finished has no section either
    Run.open(d, device="cpu", verify=False).manifest.start("specialists", {}, d / "specialists")
    assert list(Page(render_page(d)).sections) == ["config", "generalist", "subsets"]


def test_export_files_are_checked_against_their_recorded_sha256(tiny_run, tmp_path):
    d = _copy(tiny_run.run_dir, tmp_path)
    folder = d / "export"
    folder.mkdir()
    (folder / "student.onnx").write_bytes(b"graph bytes")
    (folder / "student.onnx.data").write_bytes(b"weights, changed after the export")
    graph = {"file": "student.onnx", "sha256": hashlib.sha256(b"graph bytes").hexdigest(),
             "external_data": [{"file": "student.onnx.data", "sha256": hashlib.sha256(b"weights").hexdigest()}]}
    meta = {"format": "specialists-onnx", "kind": "model", "model": "student",
            "input": {"name": "input", "shape": [None, 3, 8, 8]}, "output": {"name": "probs", "shape": [None, 9]},
            "graph": graph, "exporter": {"opset": 20},
            "verification": {"rows": 256, "tolerance": 1e-4, "max_abs_diff": {"student.onnx": 3e-7}},
            # a text export's tokenizer is one of its files too (here missing)
            "preprocessing": {"tokenizer": {"file": "tokenizer.json", "sha256": "0" * 64}}}
    (folder / "student.json").write_text(json.dumps(meta))
    (folder / "notes.json").write_text("{}")  # not an export's JSON: ignored
    text = " ".join(Page(render_page(d)).sections["export"].split())
    assert "student.onnx 11 " in text and "matches" in text  # 11 bytes, the recorded sha256
    assert "tokenizer.json - 0000000000000000 missing" in text
    assert "changed since the export" in text
    assert "256 test examples" in text and "3.00e-07 yes" in text
    assert "notes.json" not in text


def test_markdown_tables_keep_their_alignment_and_inline_styles():
    chunks = markdown_blocks("# Title\n\nintro **bold** and `code`\n\n## A\n\n| k | v |\n|---|---:|\n| x | 1 |\n\n"
                             "![plot](plot.png)\n")
    assert [t for t, _ in chunks] == ["", "A"]
    assert chunks[0][1] == [{"kind": "p", "spans": [("", "intro "), ("b", "bold"), ("", " and "), ("code", "code")]}]
    heading, table = chunks[1][1]  # the image line is dropped: the page embeds PNGs itself
    assert heading == {"kind": "heading", "spans": [("", "A")]}
    assert table["align"] == ["left", "right"] and table["rows"] == [[[("", "x")], [("", "1")]]]


def test_bad_input_is_one_line(tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    assert error_line_within(lambda: main(["report", str(plain)])) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {plain} is not a run directory (no config.yaml)"]

    fresh = tmp_path / "fresh"  # a run whose first stage was started, never finished
    run = Run(tiny_config(fresh))
    run.save_config()
    run.manifest.start("generalist", {}, run.generalist.dir)
    assert error_line_within(lambda: main(["report", str(fresh)])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {fresh} has no finished stage yet, nothing to report: run `specialists run CONFIG` "
                   "(or a stage's command) first"]
    assert not (fresh / "report.html").exists()
