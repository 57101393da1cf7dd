"""Text data: the CSV / TSV / JSONL loaders and their one-line errors, the generated text, the
tokenizer (trained once on the training split, saved, reused by every stage and by inference)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from specialists.data import PAD_ID, build_dataset
from specialists.errors import SpecialistsError
from specialists.rundir import Run
from specialists.rundir.config import load_config


def _cfg(*extra: str, run_dir="runs/unused"):
    return load_config(None, [f"run_dir={run_dir}", "device=cpu", "model.name=textcnn", *extra])


def _write(path: Path, rows: list[dict]) -> Path:
    """rows -> a .csv, .tsv or .jsonl file by the suffix."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        sep = "\t" if path.suffix == ".tsv" else ","
        keys = list(rows[0])
        path.write_text("\n".join([sep.join(keys)] + [sep.join(str(r[k]) for k in keys) for r in rows]) + "\n")
    return path


def _rows(n: int, labels=("spam", "ham", "eggs")) -> list[dict]:
    return [{"text": f"text number {i} about {labels[i % len(labels)]}", "label": labels[i % len(labels)],
             "group": "food" if labels[i % len(labels)] != "spam" else "mail"} for i in range(n)]


def test_a_folder_of_csv_tsv_and_jsonl_files_loads_with_its_val_file_and_coarse_labels(tmp_path):
    _write(tmp_path / "train.csv", _rows(30))
    _write(tmp_path / "test.tsv", _rows(9))
    _write(tmp_path / "val.jsonl", _rows(6))
    ds = build_dataset(_cfg("data.name=text", f"data.path={tmp_path}", "data.coarse_field=group",
                            "data.max_length=16").data)
    assert ds.class_names == ["eggs", "ham", "spam"]  # string labels: sorted
    assert (len(ds.train), len(ds.val), len(ds.test)) == (30, 6, 9)  # the val file is the val split
    assert ds.val.text == [r["text"] for r in _rows(6)]
    assert ds.train.text[4] == "text number 4 about ham" and int(ds.train.y[4]) == 1
    assert ds.coarse_names == ["food", "mail"] and ds.fine_to_coarse == [0, 0, 1]
    assert ds.train.x.dtype == torch.int64 and ds.train.x.shape == (30, 16)
    assert (ds.train.x[:, 0] != PAD_ID).all()


def test_one_file_holds_out_a_stratified_fifth_and_classes_txt_fixes_names_and_order(tmp_path):
    rows = [{"text": f"words {i}", "label": i % 3} for i in range(50)]
    _write(tmp_path / "all.jsonl", rows)
    (tmp_path / "classes.txt").write_text("zero\none\ntwo\n")
    ds = build_dataset(_cfg("data.name=text", f"data.path={tmp_path / 'all.jsonl'}").data)
    assert ds.class_names == ["zero", "one", "two"]
    assert np.bincount(ds.test.y.numpy()).tolist() == [3, 3, 3]  # round(0.2 * n_c), n_c = 17, 17, 16
    assert len(ds.train) + len(ds.val) + len(ds.test) == 50
    for split in (ds.train, ds.test):  # every text keeps its own label
        assert all(int(t.split()[1]) % 3 == int(y) for t, y in zip(split.text, split.y))


@pytest.mark.parametrize("name, content, expected", [
    ("train.csv", "text,label\nhello,a\n,b\n", "train.csv line 3: the text ('text') is empty"),
    ("train.csv", "body,label\nhello,a\n", "train.csv line 2: no field 'text' (fields: body, label"),
    ("train.jsonl", '{"text": "a", "label": "x"}\nnot json\n', "train.jsonl line 2: not a JSON object"),
    ("test.tsv", "text\tlabel\nhi\tnosuchclass\n", "test.tsv line 2: label 'nosuchclass' is not a class"),
])
def test_bad_text_files_are_one_line_naming_the_file_and_line(tmp_path, name, content, expected):
    for stem, rows in (("train", _rows(6)), ("test", _rows(3))):
        if not name.startswith(stem):
            _write(tmp_path / f"{stem}.jsonl", rows)
    (tmp_path / name).write_text(content)
    with pytest.raises(SpecialistsError) as err:
        build_dataset(_cfg("data.name=text", f"data.path={tmp_path}").data)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_the_generated_text_plants_its_groups_and_is_deterministic():
    cfg = _cfg("data.name=synthetic_text", "data.num_super=3", "data.classes_per_super=2", "data.train_per_class=40",
               "data.test_per_class=10", "data.vocab_size=300").data
    a, b = build_dataset(cfg), build_dataset(cfg)
    assert a.train.text == b.train.text and a.class_names[:2] == ["t0_c0", "t0_c1"]
    words = [{w for t, y in zip(a.train.text, a.train.y.tolist()) if y == c for w in t.split()} for c in range(6)]
    # classes of one topic share their topic's words and each other's (16 words), classes of two
    # topics only the filler words, which a third class also has
    assert len((words[0] & words[1]) - words[2] - words[4]) >= 12
    assert len((words[0] & words[2]) - words[1] - words[4]) <= 2


def test_the_tokenizer_is_trained_once_saved_and_gives_inference_the_same_ids(tmp_path, monkeypatch):
    from tokenizers import Tokenizer

    from specialists.data import TextEncoder
    from specialists.inference.predictor import Predictor

    over = ("data.name=synthetic_text", "data.num_super=2", "data.classes_per_super=2", "data.train_per_class=30",
            "data.test_per_class=5", "data.vocab_size=300", "data.max_length=12", "subsets.num_specialists=2")
    run = Run(_cfg(*over, run_dir=tmp_path / "run"))
    ds = run.data
    saved = Tokenizer.from_file(str(run.tokenizer_json))  # an independent reader of the saved file
    first = ds.train.text[0]
    ref = saved.encode(first, add_special_tokens=False).ids[:12]
    assert ds.train.x[0, :len(ref)].tolist() == ref and (ds.train.x[0, len(ref):] == PAD_ID).all()
    assert json.loads(run.data_json.read_text())["tokenizer"] == "tokenizer.json"

    def no_training(*a, **k):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(TextEncoder, "train", no_training)
    again = Run(_cfg(*over, run_dir=tmp_path / "run")).data  # a later stage: the saved tokenizer
    assert torch.equal(again.train.x, ds.train.x)
    ids = Predictor(Run(_cfg(*over, run_dir=tmp_path / "run")).data_info(), "cpu").preprocess(ds.train.text[:4])
    assert torch.equal(ids, ds.train.x[:4, :ids.shape[1]]) and (ds.train.x[:4, ids.shape[1]:] == PAD_ID).all()
    monkeypatch.undo()
    changed = Run(_cfg(*over, "data.vocab_size=400", run_dir=tmp_path / "run")).data  # another vocabulary: retrained
    assert changed.encoder.vocab_size > ds.encoder.vocab_size


def test_bpe_and_a_users_tokenizer_file(tmp_path):
    over = ("data.name=synthetic_text", "data.num_super=2", "data.classes_per_super=2", "data.train_per_class=20",
            "data.test_per_class=5", "data.vocab_size=300", "data.max_length=400", "subsets.num_specialists=2")
    for kind in ("bpe", "wordpiece"):  # each decodes its ids back to the text ([PAD] is id 0: no shift)
        ds = build_dataset(_cfg(*over, f"data.tokenizer={kind}").data)
        ids = ds.train.x[0][ds.train.x[0] != PAD_ID].tolist()
        assert ds.encoder.shift == 0 and ds.encoder.tokenizer.decode(ids).strip() == ds.train.text[0], kind
    bpe = ds
    # a user's tokenizer whose id 0 is a real token: every id moves up one, 0 pads
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for t in bpe.train.text + bpe.test.text for w in t.split()})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words + ["<unk>"])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    own = build_dataset(_cfg(*over, f"data.tokenizer={tmp_path / 'tokenizer.json'}").data)
    first = own.train.text[0].split()
    assert own.train.x[0, :len(first)].tolist() == [words.index(w) + 1 for w in first]
    assert own.encoder.vocab_size == len(words) + 2


def test_text_configs_are_checked():
    from specialists.errors import ConfigError

    for over, key in ((("data.name=synthetic_text", "model.name=cnn"), "model.name"),
                      (("data.name=synthetic", "model.name=bilstm"), "model.name"),
                      (("data.name=synthetic_text", "student.model.name=soft_tree"), "student.model.name"),
                      (("data.name=synthetic_text", "data.tokenizer=nosuch"), "data.tokenizer"),
                      (("data.name=synthetic_text", "model.pooling=sum"), "model.pooling"),
                      (("data.name=synthetic_text", "student.teacher=api"), "student.teacher_url"),
                      (("data.name=synthetic_text", "student.teacher=api", "student.teacher_url=http://x",
                        "distill.loss=mse_logits"), "distill.loss"),
                      (("data.name=synthetic_text", "student.unlabelled=/nonexistent"), "student.unlabelled")):
        with pytest.raises(ConfigError, match=f"'{key}'"):
            load_config(None, ["model.name=textcnn", *over])
