"""The machine's own Debian package index as a text classification data set, nothing downloaded.

    python examples/debian_packages.py OUT_DIR [--min-per-section 100]

reads ``apt-cache dumpavail`` (the package lists ``apt-get update`` fetched) and writes
``OUT_DIR/train.jsonl`` and ``OUT_DIR/test.jsonl`` (a fixed, seeded, stratified 20%), one
``{"text": description, "label": section}`` per package, for ``data.name=text data.path=OUT_DIR``.
The text is the package's description (its summary line and any long lines), without the
package's name; the label is its section with the archive area dropped (``contrib/libs`` is
``libs``). Packages whose description is word for word another's (``-dbg`` twins, say) are kept
once, so no text is in both splits, and sections with fewer than ``--min-per-section`` packages
are left out.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import subprocess
from pathlib import Path


def packages(text: str):
    """(section, description) of every stanza of ``apt-cache dumpavail``'s output."""
    for stanza in text.split("\n\n"):
        fields, key = {}, None
        for line in stanza.splitlines():
            if line.startswith((" ", "\t")) and key:  # a continuation of the field above
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Section" in fields and "Description" in fields:
            long = [w for w in fields["Description"].splitlines() if w != "."]
            yield fields["Section"].rsplit("/", 1)[-1], " ".join(long)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--min-per-section", type=int, default=100)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    dump = subprocess.run(["apt-cache", "dumpavail"], check=True, capture_output=True, text=True).stdout
    seen, rows = set(), []
    for section, text in packages(dump):
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": section})
    counts = collections.Counter(r["label"] for r in rows)
    rows = [r for r in rows if counts[r["label"]] >= args.min_per_section]
    by_label = collections.defaultdict(list)
    for r in rows:
        by_label[r["label"]].append(r)
    rng, train, test = random.Random(args.seed), [], []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        k = round(args.test_fraction * len(group))
        test += group[:k]
        train += group[k:]
    rng.shuffle(train)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", train), ("test", test)):
        with open(args.out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in split)
    print(f"{len(train)} train and {len(test)} test descriptions in {len(by_label)} sections -> {args.out}")
    for label, n in collections.Counter(r["label"] for r in rows).most_common():
        print(f"  {label}: {n}")


if __name__ == "__main__":
    main()
