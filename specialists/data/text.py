"""``text``: labelled texts from CSV, TSV or JSONL files (``data.path``), all offline.

``data.path`` is a folder with ``train.*`` and ``test.*`` (and optionally ``val.*``, which then
is the validation split instead of a share of train), each ``.csv``, ``.tsv`` or ``.jsonl``;
or one such file, of which a fixed stratified 20% (seed 0) is the test set. Every row has a
text (``data.text_field``, default ``text``) and a label (``data.label_field``, default
``label``): a class name or an integer class id; optionally a coarse label
(``data.coarse_field``), used to score the subsets against a known grouping.

Classes: a ``classes.txt`` beside the files (one name per line) fixes the class names and
their order (string labels must be among them; integer labels index them); without it, string
labels are the classes in sorted order and integer labels are the class ids.

Bad files are one line naming the file and line: a missing column, an empty text, a label that
is not a class, a line that is not JSON.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..errors import SpecialistsError, one_line
from .registry import register
from .splits import stratified_split
from .types import RawData

SUFFIXES = (".csv", ".tsv", ".jsonl")
TEST_FRACTION, TEST_SEED = 0.2, 0  # one file: its held-out test share, fixed (not data.split_seed)
_INT = re.compile(r"^\s*-?\d+\s*$")


class Table:
    """One file's rows: ``texts``, raw ``labels`` (str or int), optional ``coarse``, and the
    file line of each row (for errors)."""

    def __init__(self, path: Path):
        self.path, self.texts, self.labels, self.coarse, self.lines = path, [], [], [], []


def _rows(path: Path, strings: bool = False):
    """(line number, {field: value}) of a CSV, TSV or JSONL file (``strings``: a JSONL line may
    also be a plain JSON string)."""
    try:
        f = open(path, encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise SpecialistsError(f"{path}: cannot open ({one_line(exc)})") from None
    with f:
        try:
            if path.suffix.lower() == ".jsonl":
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise SpecialistsError(f"{path} line {n}: not a JSON object ({exc.msg})") from None
                    if not isinstance(row, dict) and not (strings and isinstance(row, str)):
                        raise SpecialistsError(f"{path} line {n}: not a JSON object")
                    yield n, row
            else:
                csv.field_size_limit(sys.maxsize)
                reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
                for row in reader:
                    yield reader.line_num, row
        except UnicodeDecodeError as exc:
            raise SpecialistsError(f"{path}: not UTF-8 text ({one_line(exc)})") from None
        except csv.Error as exc:
            raise SpecialistsError(f"{path}: not a readable {path.suffix[1:].upper()} file ({one_line(exc)})") from None


def read_table(path: Path, text_field: str, label_field: str, coarse_field: Optional[str]) -> Table:
    """Read one file; one line per problem, naming the file and line."""
    t = Table(path)
    for n, row in _rows(path):
        for field in (text_field, label_field, coarse_field):
            if field is not None and field not in row:
                raise SpecialistsError(f"{path} line {n}: no field '{field}' (fields: {', '.join(map(str, row))}; "
                                       "set data.text_field / data.label_field / data.coarse_field)")
        text, label = row[text_field], row[label_field]
        if not isinstance(text, str) or not text.strip():
            raise SpecialistsError(f"{path} line {n}: the text ('{text_field}') is empty" if isinstance(text, str) or
                                   text is None else f"{path} line {n}: the text ('{text_field}') is not a string")
        for what, field in [("label", label_field)] + ([("coarse label", coarse_field)] if coarse_field else []):
            value = row[field]
            # a null or empty label would become a class of its own ('None')
            if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, str) and not value.strip()):
                raise SpecialistsError(f"{path} line {n}: the {what} ('{field}') must be a class name or id, "
                                       f"got {value!r}")
        t.texts.append(text)
        t.labels.append(label.strip() if isinstance(label, str) else label)
        t.coarse.append(row[coarse_field] if coarse_field else None)
        t.lines.append(n)
    if not t.texts:
        raise SpecialistsError(f"{path}: no rows")
    return t


def _find(folder: Path, stem: str) -> Optional[Path]:
    found = [folder / f"{stem}{s}" for s in SUFFIXES if (folder / f"{stem}{s}").is_file()]
    if len(found) > 1:
        raise SpecialistsError(f"{folder}: both {found[0].name} and {found[1].name}; keep one {stem} file")
    return found[0] if found else None


def _class_ids(tables: List[Table], names: Optional[List[str]], what: str):
    """Map every table's raw labels to class ids; returns (ids per table, class names or None)."""
    is_int = [all(isinstance(v, int) or _INT.match(v) for v in t.labels) for t in tables]
    if names is None and not all(is_int):
        names = sorted({str(v) for t in tables[:1] for v in t.labels})  # the classes are the training labels
    out = []
    for t, ints in zip(tables, is_int):
        if names is not None and not ints:
            lookup = {c: i for i, c in enumerate(names)}
            ids = [lookup.get(str(v), -1) for v in t.labels]
        else:
            ids = [int(v) for v in t.labels]
            if names is not None:
                ids = [i if 0 <= i < len(names) else -1 for i in ids]
        bad = next((j for j, i in enumerate(ids) if i < 0), None)
        if bad is not None:
            source = "classes.txt" if what == "classes.txt" else "the training file's labels"
            raise SpecialistsError(f"{t.path} line {t.lines[bad]}: label {t.labels[bad]!r} is not a class "
                                   f"(the classes are {source})")
        out.append(np.asarray(ids, np.int64))
    return out, names


@register("text", needs_path=True, default_augment="none", text=True,
          description="labelled texts from CSV, TSV or JSONL files (data.path)")
def load_text(cfg) -> RawData:
    path = Path(str(cfg.path)).expanduser()
    if not path.exists():
        raise SpecialistsError(f"data.path '{path}' does not exist")
    fields = (cfg.text_field, cfg.label_field, cfg.coarse_field)
    val_rows = None
    if path.is_dir():
        train, test = _find(path, "train"), _find(path, "test")
        if train is None or test is None:
            raise SpecialistsError(f"{path}: needs train.* and test.* files ({', '.join(SUFFIXES)}), or give one file")
        val = _find(path, "val")
        tables = [read_table(p, *fields) for p in (train, test) + ((val,) if val else ())]
        classes_txt = path / "classes.txt"
    else:
        if path.suffix.lower() not in SUFFIXES:
            raise SpecialistsError(f"{path}: a text data set is a {', '.join(SUFFIXES)} file or a folder of them")
        tables = [read_table(path, *fields)]
        classes_txt = path.parent / "classes.txt"
    names = None
    if classes_txt.is_file():
        try:
            names = [line.strip() for line in classes_txt.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecialistsError(f"{classes_txt}: cannot read it as UTF-8 text ({one_line(exc)})") from None
    ids, names = _class_ids(tables, names, "classes.txt" if classes_txt.is_file() else "train")
    coarse = None
    if cfg.coarse_field:
        coarse_ids, coarse_names = _class_ids(
            [_as_labels(t, t.coarse) for t in tables], None, "train")
        coarse = coarse_ids
    texts = [t.texts for t in tables]
    if len(tables) == 1:  # one file: a fixed stratified share is the test set
        tr, te = stratified_split(ids[0], TEST_FRACTION, TEST_SEED)
        texts = [[texts[0][i] for i in tr], [texts[0][i] for i in te]]
        ids = [ids[0][tr], ids[0][te]]
        coarse = [coarse[0][tr], coarse[0][te]] if coarse else None
    elif len(tables) == 3:  # a val file: appended to train, and it is the validation split
        val_rows = np.arange(len(texts[0]), len(texts[0]) + len(texts[2]))
        texts = [texts[0] + texts[2], texts[1]]
        ids = [np.concatenate([ids[0], ids[2]]), ids[1]]
        coarse = [np.concatenate([coarse[0], coarse[2]]), coarse[1]] if coarse else None
    return RawData(
        x_train=texts[0], y_train=ids[0], x_test=texts[1], y_test=ids[1],
        class_names=names, num_classes=len(names) if names is not None else None,
        y_train_coarse=coarse[0] if coarse else None, y_test_coarse=coarse[1] if coarse else None,
        coarse_names=coarse_names if coarse else None, kind="text", val_rows=val_rows,
    )


def _as_labels(t: Table, values: list) -> Table:
    c = Table(t.path)
    c.labels, c.lines = [v.strip() if isinstance(v, str) else v for v in values], t.lines
    return c


def read_texts(path, text_field: str = "text") -> List[str]:
    """Texts without labels (``student.unlabelled``): a ``.txt`` file (one text per non-empty
    line), a ``.jsonl`` file (objects with ``text_field``, or JSON strings), or a ``.csv`` /
    ``.tsv`` file with a ``text_field`` column. An empty text is one line naming the file and line."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".txt":
        out = []
        for n, row in _rows(path, strings=True):
            text = row if isinstance(row, str) else row.get(text_field)
            if not isinstance(text, str) or not text.strip():
                raise SpecialistsError(f"{path} line {n}: no text (a JSON string, or a '{text_field}' field that is "
                                       "a non-empty string)")
            out.append(text)
        return out
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecialistsError(f"{path}: cannot read it as UTF-8 text ({one_line(exc)})") from None
    out = [line for line in lines if line.strip()]
    if not out:
        raise SpecialistsError(f"{path}: no texts")
    return out
