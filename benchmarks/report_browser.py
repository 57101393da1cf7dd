"""A run's report page in a real browser: every section rendered, every image decoded, nothing fetched.

    python benchmarks/report_browser.py RUN_DIR [--screenshot docs/report.png] [--chromium chromium]

Renders RUN_DIR's page (``specialists report``: :mod:`specialists.reports.page`) into a temporary
folder and opens it in headless Chromium (Debian's ``chromium``: ``apt-get install chromium``),
with a fresh profile and the background services off, twice:

1. ``--dump-dom`` of a copy of the page with a small script inserted first in its ``<head>``
   (before the page's Content-Security-Policy, which forbids scripts and would block it): on the
   load event it writes into the DOM, as JSON, each ``<img>``'s state (decoded: ``complete`` and
   ``naturalWidth > 0``), each ``<section>``'s id and rendered height, every resource the page
   fetched (``performance.getEntriesByType("resource")``; ``data:`` URIs are not fetched) and every
   Content-Security-Policy violation (a request the page tried and the policy refused). The
   dumped DOM is parsed and checked against the page's own HTML: the same sections in the same
   order, each taller than its title; as many images, each decoded; no resource, no violation.
2. ``--screenshot`` of the page itself (``--window-size``), shrunk to a 256-colour PNG (Pillow)
   when that is smaller.

Prints what it checked; exits 1 when a check fails (not part of the test suite: it needs Chromium).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from specialists.reports.page import render_page  # noqa: E402

CHECK_ID = "browser-check"
PROBE = """<script>
var violations = [];
document.addEventListener("securitypolicyviolation", function (e) {
  violations.push(e.violatedDirective + " " + e.blockedURI);
});
window.addEventListener("load", function () {
  var images = Array.prototype.map.call(document.images, function (img) {
    return {decoded: img.complete && img.naturalWidth > 0, width: img.naturalWidth, height: img.naturalHeight};
  });
  var sections = Array.prototype.map.call(document.querySelectorAll("section"), function (s) {
    return {id: s.id, height: s.offsetHeight, title: s.querySelector("h2").offsetHeight};
  });
  var out = document.createElement("pre");
  out.id = "%s";
  out.textContent = JSON.stringify({images: images, sections: sections, violations: violations,
    resources: performance.getEntriesByType("resource").map(function (r) { return r.name; })});
  document.body.appendChild(out);
});
</script>""" % CHECK_ID
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--no-default-browser-check", "--hide-scrollbars"]


class Source(HTMLParser):
    """The page's sections (ids, in order) and images, as its HTML says."""

    def __init__(self, html: str):
        super().__init__()
        self.sections, self.images, self.check = [], 0, ""
        self._in_check = False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a["id"])
        elif tag == "img":
            self.images += 1
        elif a.get("id") == CHECK_ID:
            self._in_check = True

    def handle_endtag(self, tag):
        self._in_check = False

    def handle_data(self, data):
        if self._in_check:
            self.check += data


def chromium(binary: str, args: list[str], profile: Path, timeout: float) -> subprocess.CompletedProcess:
    cmd = [binary, *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--screenshot", help="write a screenshot of the page here (PNG)")
    p.add_argument("--window-size", default="1200,2400")
    p.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per Chromium call")
    args = p.parse_args(argv)

    html = render_page(args.run_dir)
    source = Source(html)
    print(f"page: {len(html) / 1024:.0f} KiB, sections {source.sections}, {source.images} images")
    failures = []
    with tempfile.TemporaryDirectory(prefix="report-browser-") as tmp:
        tmp = Path(tmp)
        page, probed = tmp / "report.html", tmp / "probed.html"
        page.write_text(html)
        head = html.index("<head>") + len("<head>")
        probed.write_text(html[:head] + "\n" + PROBE + html[head:])

        done = chromium(args.chromium, ["--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
                        tmp / "profile-dom", args.timeout)
        dom = Source(done.stdout)
        if done.returncode != 0 or not dom.check:
            print(f"chromium --dump-dom failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
            return 1
        seen = json.loads(dom.check)
        ids = [s["id"] for s in seen["sections"]]
        flat = [s["id"] for s in seen["sections"] if s["height"] <= s["title"]]
        bad = [i for i, img in enumerate(seen["images"]) if not img["decoded"]]
        print(f"chromium: sections rendered {ids} (heights {[s['height'] for s in seen['sections']]} px)")
        print(f"chromium: {len(seen['images'])} images, {len(seen['images']) - len(bad)} decoded "
              f"(sizes {[(i['width'], i['height']) for i in seen['images']]})")
        print(f"chromium: resources fetched {seen['resources']}, policy violations {seen['violations']}")
        if ids != source.sections:
            failures.append(f"sections rendered {ids}, the page has {source.sections}")
        if flat:
            failures.append(f"sections with nothing under their title: {flat}")
        if len(seen["images"]) != source.images or bad:
            failures.append(f"images: {len(seen['images'])} in the browser, {source.images} in the page, "
                            f"not decoded: {bad}")
        if seen["resources"] or seen["violations"]:
            failures.append("the page fetched or tried to fetch something")

        if args.screenshot:
            shot = tmp / "shot.png"
            done = chromium(args.chromium, [f"--screenshot={shot}", f"--window-size={args.window_size}",
                                            "--virtual-time-budget=10000", page.as_uri()], tmp / "profile-shot",
                            args.timeout)
            if done.returncode != 0 or not shot.is_file():
                failures.append(f"chromium --screenshot failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
            else:
                out = Path(args.screenshot)
                out.parent.mkdir(parents=True, exist_ok=True)
                small = tmp / "small.png"
                from PIL import Image

                Image.open(shot).convert("RGB").quantize(256).save(small, optimize=True)
                best = min((shot, small), key=lambda f: f.stat().st_size)
                shutil.copyfile(best, out)
                os.chmod(out, 0o644)
                print(f"screenshot: {out} ({out.stat().st_size / 1024:.0f} KiB, window {args.window_size})")
    for f in failures:
        print(f"FAILED: {f}")
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
