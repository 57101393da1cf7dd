"""Tests for the data registry and the device batcher.

The torchvision entries run on small fake files written here in torchvision's real on-disk
formats (CIFAR pickles, MNIST idx files) and are parsed by torchvision's own classes, not by
mocks. CIFAR's loader also compares each file's md5 with the official data set's; fake files
cannot match those, so the CIFAR tests set the expected md5 sums to those of the fake files
(``_accept_fake_cifar``): torchvision's integrity check still runs, against the files written.
Nothing here reads ``../shared/data``.
"""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest
import torch

from specialists.data import (
    DATASETS,
    Batcher,
    EpochBatches,
    Preprocessing,
    Split,
    batcher_for,
    build_dataset,
    epoch_generator,
    seeded_batches,
    stratified_split,
)
from specialists.errors import SpecialistsError
from specialists.rundir.config import DataConfig


def raw_of(**kw):
    """What the registry entry returns (before splitting), decoded as data.storage=memory does
    when the entry reads its images lazily."""
    cfg = DataConfig(**kw)
    raw = DATASETS[cfg.name].loader(cfg)
    if raw.x_train is None:
        raw.x_train, raw.x_test = raw.decode(cfg.resize)
    return raw


def one_line_error(cfg: DataConfig, *fragments: str) -> str:
    with pytest.raises(SpecialistsError) as info:
        build_dataset(cfg)
    msg = str(info.value)
    assert msg and "\n" not in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def check_split_invariants(ds, n_train_total: int):
    tr, va = ds.train.index.numpy(), ds.val.index.numpy()
    assert len(np.intersect1d(tr, va)) == 0
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(n_train_total))
    for s in (ds.train, ds.val, ds.test):
        assert s.y.dtype == torch.int64 and s.x.shape[0] == len(s.y)
        assert int(s.y.min()) >= 0 and int(s.y.max()) < ds.num_classes
    assert len(ds.class_names) == ds.num_classes


# ------------------------------------------------------------------------- synthetic & digits


SMALL_SYN = dict(name="synthetic", num_super=2, classes_per_super=3, train_per_class=20, test_per_class=5, image_size=8)


def test_synthetic_image_coarse_labels_are_planted_groups_and_deterministic():
    a = build_dataset(DataConfig(**SMALL_SYN))
    b = build_dataset(DataConfig(**SMALL_SYN))
    assert a.train.x.dtype == torch.uint8 and a.train.x.shape[1:] == (3, 8, 8) and a.input_shape == (3, 8, 8)
    assert a.num_classes == 6 and a.fine_to_coarse == [0, 0, 0, 1, 1, 1]
    assert a.coarse_names == ["super0", "super1"] and a.augment == "crop"
    for s in ("train", "val", "test"):
        sa, sb = a.split(s), b.split(s)
        assert torch.equal(sa.x, sb.x) and torch.equal(sa.y, sb.y)
        assert torch.equal(sa.y_coarse, sa.y // 3)
    assert len(a.test) == 30
    check_split_invariants(a, 120)
    c = build_dataset(DataConfig(**SMALL_SYN, split_seed=1))
    assert not torch.equal(a.test.x, c.test.x)  # synthetic data follow split_seed


def test_synthetic_vector_variant():
    ds = build_dataset(DataConfig(**SMALL_SYN, variant="vector"))
    assert ds.train.x.dtype == torch.float32 and ds.input_shape == (64,) and not ds.is_image
    assert ds.augment == "none" and ds.fine_to_coarse == [0, 0, 0, 1, 1, 1]
    assert len(ds.mean) == 64 and len(ds.std) == 64


def test_digits_shapes_split_and_determinism():
    ds = build_dataset(DataConfig(name="digits"))
    assert ds.input_shape == (1, 8, 8) and ds.train.x.dtype == torch.uint8
    assert ds.class_names == [str(i) for i in range(10)] and ds.num_classes == 10
    assert ds.augment == "none" and not ds.has_coarse
    n_tr, n_te = len(ds.train) + len(ds.val), len(ds.test)
    assert n_tr + n_te == 1797 and abs(n_te - 0.2 * 1797) < 10
    assert int(ds.train.x.max()) == 255 and int(ds.train.x.min()) == 0
    check_split_invariants(ds, n_tr)
    # the test set is fixed; split_seed only moves the validation split
    other = build_dataset(DataConfig(name="digits", split_seed=5))
    assert torch.equal(ds.test.x, other.test.x) and torch.equal(ds.test.y, other.test.y)
    assert not torch.equal(ds.val.index, other.val.index)
    same = build_dataset(DataConfig(name="digits"))
    assert torch.equal(ds.val.index, same.val.index) and torch.equal(ds.train.x, same.train.x)
    # stratified: each class gives round(10%) of its training examples to val
    y_all = np.empty(n_tr, np.int64)
    y_all[ds.train.index.numpy()] = ds.train.y.numpy()
    y_all[ds.val.index.numpy()] = ds.val.y.numpy()
    for c in range(10):
        assert (ds.val.y == c).sum().item() == round(0.1 * (y_all == c).sum())


def test_max_train_and_stratified_split_helper():
    ds = build_dataset(DataConfig(name="digits", max_train=300))
    assert len(ds.train) + len(ds.val) == 300
    y = np.repeat(np.arange(4), [10, 20, 1, 2])
    tr, va = stratified_split(y, 0.25, 0)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(y)
    assert [int((y[va] == c).sum()) for c in range(4)] == [2, 5, 0, 1]
    assert np.array_equal(stratified_split(y, 0.25, 0)[1], va)


# ------------------------------------------------------------------------------------------ npz


def images_nhwc(n, h=6, w=5, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def test_npz_single_file_images_with_names_and_coarse(tmp_path):
    x_tr, x_te = images_nhwc(40), images_nhwc(12, seed=1)
    y_tr, y_te = np.arange(40) % 4, np.arange(12) % 4
    p = tmp_path / "d.npz"
    np.savez(p, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
             y_train_coarse=y_tr // 2, y_test_coarse=y_te // 2,
             class_names=np.array(["a", "b", "c", "d"]), coarse_names=np.array(["ab", "cd"]))
    ds = build_dataset(DataConfig(name="npz", path=str(p)))
    assert ds.input_shape == (3, 6, 5) and ds.class_names == ["a", "b", "c", "d"]
    assert ds.coarse_names == ["ab", "cd"] and ds.fine_to_coarse == [0, 0, 1, 1]
    assert ds.augment == "none"  # under 16 pixels: no crop (test_default_augment_by_size_and_channels)
    check_split_invariants(ds, 40)
    j = ds.train.index[3].item()
    assert np.array_equal(ds.train.x[3].numpy(), x_tr[j].transpose(2, 0, 1))
    assert np.array_equal(ds.test.x.numpy(), x_te.transpose(0, 3, 1, 2))
    assert torch.equal(ds.train.y_coarse, ds.train.y // 2)


def test_npz_nchw_grayscale_and_vectors(tmp_path):
    x = images_nhwc(30, 7, 7, 1)
    y = np.arange(30) % 3
    p = tmp_path / "g.npz"
    np.savez(p, x_train=x.transpose(0, 3, 1, 2), y_train=y, x_test=x[:6].transpose(0, 3, 1, 2), y_test=y[:6])
    ds = build_dataset(DataConfig(name="npz", path=str(p)))
    assert ds.input_shape == (1, 7, 7) and ds.augment == "none"
    assert np.array_equal(ds.test.x.numpy(), x[:6].transpose(0, 3, 1, 2))
    assert ds.class_names == ["0", "1", "2"] and not ds.has_coarse
    # 3-channel NCHW
    x3 = images_nhwc(10, 8, 9, 3)
    np.savez(p, x_train=x3.transpose(0, 3, 1, 2), y_train=np.arange(10) % 2, x_test=x3[:2].transpose(0, 3, 1, 2),
             y_test=np.array([0, 1]))
    ds = build_dataset(DataConfig(name="npz", path=str(p)))
    assert ds.input_shape == (3, 8, 9) and np.array_equal(ds.test.x.numpy(), x3[:2].transpose(0, 3, 1, 2))
    # vectors
    v = np.random.default_rng(0).normal(size=(20, 5))
    np.savez(p, x_train=v, y_train=np.arange(20) % 2, x_test=v[:4], y_test=np.arange(4) % 2)
    ds = build_dataset(DataConfig(name="npz", path=str(p)))
    assert ds.input_shape == (5,) and ds.train.x.dtype == torch.float32 and ds.augment == "none"


def write_shards(folder, listed=True, coarse_in_shards=True, sizes=(7, 9, 8), n_test=6, classes=4):
    """A sharded folder shaped like ../shared/data/cifar100 (meta.json keys included)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    fine_to_coarse = [i // 2 for i in range(classes)]
    parts = {"train": [], "test": []}
    entries = {"train": [], "test": []}
    for split, ns in (("train", sizes), ("test", (n_test,))):
        for i, n in enumerate(ns):
            x = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
            y = rng.integers(0, classes, n).astype(np.int64)
            arrays = dict(x=x, y=y)
            if coarse_in_shards:
                arrays["y_coarse"] = np.asarray(fine_to_coarse)[y]
            name = f"{split}-{i}.npz"
            np.savez(folder / name, **arrays)
            parts[split].append((x, y))
            entries[split].append({"file": name, "n": n, "sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest()})
    meta = {"fine_names": [f"f{i}" for i in range(classes)], "coarse_names": [f"c{i}" for i in range(classes // 2)],
            "fine_to_coarse": fine_to_coarse, "name": "toy", "image_shape": [4, 4, 3], "dtype": "uint8",
            "layout": "NHWC"}
    if listed:
        meta.update(train=entries["train"], test=entries["test"])
    (folder / "meta.json").write_text(json.dumps(meta))
    cat = lambda s: (np.concatenate([p[0] for p in parts[s]]), np.concatenate([p[1] for p in parts[s]]))
    return cat("train"), cat("test"), fine_to_coarse


@pytest.mark.parametrize("listed,coarse_in_shards", [(True, True), (False, False)])
def test_npz_sharded_folder(tmp_path, listed, coarse_in_shards):
    (x_tr, y_tr), (x_te, y_te), f2c = write_shards(tmp_path / "toy", listed, coarse_in_shards)
    raw = raw_of(name="npz", path=str(tmp_path / "toy"))
    assert np.array_equal(raw.x_train, x_tr.transpose(0, 3, 1, 2)) and np.array_equal(raw.y_train, y_tr)
    assert np.array_equal(raw.x_test, x_te.transpose(0, 3, 1, 2)) and np.array_equal(raw.y_test, y_te)
    assert np.array_equal(raw.y_train_coarse, np.asarray(f2c)[y_tr])
    ds = build_dataset(DataConfig(name="npz", path=str(tmp_path / "toy")))
    assert ds.class_names == ["f0", "f1", "f2", "f3"] and ds.coarse_names == ["c0", "c1"]
    assert ds.input_shape == (3, 4, 4) and ds.augment == "none"
    assert all(ds.fine_to_coarse[c] == f2c[c] for c in np.unique(y_tr))
    check_split_invariants(ds, len(y_tr))


def test_npz_shards_sorted_naturally(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    for i in (0, 2, 10):  # train-10 must come after train-2
        np.savez(folder / f"train-{i}.npz", x=np.full((2, 4, 4, 1), i, np.uint8), y=np.array([0, 1]))
    np.savez(folder / "test-0.npz", x=np.zeros((2, 4, 4, 1), np.uint8), y=np.array([0, 1]))
    (folder / "meta.json").write_text("{}")
    raw = raw_of(name="npz", path=str(folder))
    assert raw.x_train[:, 0, 0, 0].tolist() == [0, 0, 2, 2, 10, 10] and raw.default_augment == "none"


def _bad_npz_cases(tmp_path):
    ok = dict(x_train=images_nhwc(6), y_train=np.arange(6) % 2, x_test=images_nhwc(2), y_test=np.array([0, 1]))

    def npz(name, **arrays):
        p = tmp_path / name
        np.savez(p, **arrays)
        return p

    cases = {
        "missing_key": (npz("m.npz", **{k: v for k, v in ok.items() if k != "y_test"}), ["m.npz", "y_test"]),
        "lengths": (npz("l.npz", **{**ok, "y_train": np.arange(5) % 2}), ["l.npz", "y_train", "5"]),
        "coarse_lengths": (npz("c.npz", **ok, y_train_coarse=np.zeros(3, int), y_test_coarse=np.zeros(2, int)),
                           ["c.npz", "y_train_coarse"]),
        "pickled_names": (npz("p.npz", **ok, class_names=np.array(["a", None], dtype=object)), ["p.npz", "pickle"]),
        "int_images": (npz("i.npz", **{**ok, "x_train": ok["x_train"].astype(np.int64)}), ["i.npz", "int64"]),
        "float_images": (npz("f.npz", **{**ok, "x_train": ok["x_train"] / 255.0}), ["f.npz", "vectors"]),
        "ambiguous": (npz("a.npz", **{**ok, "x_train": images_nhwc(6, 3, 5, 3)}), ["a.npz", "ambiguous"]),
        "label_vs_names": (npz("n.npz", **ok, class_names=np.array(["only"])), ["n.npz", "class name"]),
        "float_labels": (npz("y.npz", **{**ok, "y_test": np.array([0.0, 1.0])}), ["y.npz", "y_test"]),
    }
    (tmp_path / "text.npz").write_text("not an archive")
    cases["not_npz"] = (tmp_path / "text.npz", ["text.npz", "not an .npz"])
    np.save(tmp_path / "arr.npy", np.zeros(3))
    cases["npy"] = (tmp_path / "arr.npy", ["arr.npy", ".npy"])
    (tmp_path / "empty_dir").mkdir()
    cases["no_meta"] = (tmp_path / "empty_dir", ["empty_dir", "meta.json"])
    (tmp_path / "no_shards").mkdir()
    (tmp_path / "no_shards" / "meta.json").write_text("{}")
    cases["no_shards"] = (tmp_path / "no_shards", ["no_shards", "train shards"])
    write_shards(tmp_path / "wrong_n")
    meta = json.loads((tmp_path / "wrong_n" / "meta.json").read_text())
    meta["train"][1]["n"] = 99
    (tmp_path / "wrong_n" / "meta.json").write_text(json.dumps(meta))
    cases["shard_n"] = (tmp_path / "wrong_n", ["train-1.npz", "99"])
    write_shards(tmp_path / "gone")
    (tmp_path / "gone" / "train-2.npz").unlink()
    cases["missing_shard"] = (tmp_path / "gone", ["train-2.npz", "missing"])
    write_shards(tmp_path / "badjson")
    (tmp_path / "badjson" / "meta.json").write_text("{oops")
    cases["bad_json"] = (tmp_path / "badjson", ["meta.json", "JSON"])
    return cases


def test_npz_bad_inputs_give_one_line_errors(tmp_path):
    for name, (path, fragments) in _bad_npz_cases(tmp_path).items():
        msg = one_line_error(DataConfig(name="npz", path=str(path)), *fragments)
        assert "Traceback" not in msg, name


def test_npz_missing_path(tmp_path):
    one_line_error(DataConfig(name="npz", path=None), "data.path")
    one_line_error(DataConfig(name="npz", path=str(tmp_path / "nope.npz")), "nope.npz", "does not exist")


# ---------------------------------------------------------------------------------- imagefolder


def _png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_imagefolder_train_test_tree(tmp_path):
    rng = np.random.default_rng(0)
    written = {}
    for split, n in (("train", 4), ("test", 2)):
        for c in ("dog", "cat", "bird"):
            for i in range(n):
                a = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
                _png(tmp_path / split / c / f"{i}.png", a)
                written[(split, c, i)] = a
    (tmp_path / "train" / "cat" / "notes.txt").write_text("ignored")
    raw = raw_of(name="imagefolder", path=str(tmp_path))
    assert raw.class_names == ["bird", "cat", "dog"] and raw.x_train.shape == (12, 3, 6, 7)
    assert raw.x_test.shape == (6, 3, 6, 7) and raw.y_train.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert np.array_equal(raw.x_train[4], written[("train", "cat", 0)].transpose(2, 0, 1))
    assert np.array_equal(raw.x_test[5], written[("test", "dog", 1)].transpose(2, 0, 1))
    ds = build_dataset(DataConfig(name="imagefolder", path=str(tmp_path)))
    assert ds.augment == "none" and ds.input_shape == (3, 6, 7) and ds.num_classes == 3
    check_split_invariants(ds, 12)


@pytest.mark.parametrize("channels,size,layout,expected", [
    (3, 16, "nhwc", "crop_flip"), (1, 16, "nhwc", "crop"), (3, 16, "nchw", "crop_flip"), (1, 15, "nhwc", "none")])
def test_default_augment_by_size_and_channels(tmp_path, channels, size, layout, expected):
    """Colour images are cropped and flipped, grey ones (digits, characters) only cropped, and
    images under 16 pixels not at all (a 1-pixel crop of an 8x8 digit costs an MLP 7 points)."""
    x = images_nhwc(12, size, size, channels)
    y = np.arange(12) % 2
    if layout == "nchw":
        x = x.transpose(0, 3, 1, 2)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:4], y_test=y[:4])
    assert build_dataset(DataConfig(name="npz", path=str(tmp_path / "d.npz"))).augment == expected
    # an ImageFolder tree (read as NHWC) gets the same choice
    for i, a in enumerate(images_nhwc(8, size, size, channels)):
        _png(tmp_path / "tree" / "train" / f"c{i % 2}" / f"{i}.png", a[..., 0] if channels == 1 else a)
        _png(tmp_path / "tree" / "test" / f"c{i % 2}" / f"{i}.png", a[..., 0] if channels == 1 else a)
    assert build_dataset(DataConfig(name="imagefolder", path=str(tmp_path / "tree"))).augment == expected


def test_imagefolder_single_tree_grayscale_resize_and_holdout(tmp_path):
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        for i in range(10):
            size = (5, 5) if i % 2 else (9, 6)
            _png(tmp_path / c / f"{i:02d}.png", rng.integers(0, 256, size, dtype=np.uint8))
    cfg = DataConfig(name="imagefolder", path=str(tmp_path), resize=8)
    raw = raw_of(name="imagefolder", path=str(tmp_path), resize=8)
    assert raw.x_train.shape == (16, 1, 8, 8) and raw.x_test.shape == (4, 1, 8, 8)
    assert sorted(raw.y_test.tolist()) == [0, 0, 1, 1]  # stratified 20% held out
    again = raw_of(name="imagefolder", path=str(tmp_path), resize=8)
    assert np.array_equal(raw.x_test, again.x_test) and np.array_equal(raw.y_train, again.y_train)
    ds = build_dataset(cfg)
    assert ds.augment == "none" and ds.input_shape == (1, 8, 8) and ds.class_names == ["a", "b"]
    # without resize, mixed sizes cannot be held in memory: an error naming the first odd file;
    # streamed (auto), they need a resolution
    one_line_error(DataConfig(name="imagefolder", path=str(tmp_path), storage="memory"), "01.png", "data.resize")
    one_line_error(DataConfig(name="imagefolder", path=str(tmp_path)), "data.resize")


def test_imagefolder_bad_inputs(tmp_path):
    _png(tmp_path / "x" / "0.png", np.zeros((4, 4, 3), np.uint8))
    _png(tmp_path / "x" / "1.png", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "x" / "2.png").write_bytes(b"not a png")
    one_line_error(DataConfig(name="imagefolder", path=str(tmp_path)), "2.png", "cannot read")
    (tmp_path / "x" / "2.png").unlink()
    (tmp_path / "y").mkdir()
    one_line_error(DataConfig(name="imagefolder", path=str(tmp_path)), "y", "no images")
    one_line_error(DataConfig(name="imagefolder", path=str(tmp_path / "x" / "0.png")), "0.png", "folder")


# ------------------------------------------------------------------------ torchvision on disk


def _write_pickle(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _accept_fake_cifar(monkeypatch, cls, root):
    """Expect the fake files' md5 sums instead of the official ones (torchvision still checks)."""
    base = root / cls.base_folder
    monkeypatch.setattr(cls, "train_list", [[f, _md5(base / f)] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, _md5(base / f)] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(base / cls.meta["filename"])})


def write_cifar10(root, n=4, n_test=10):
    rng = np.random.default_rng(0)
    base = root / "cifar-10-batches-py"
    batches = []
    for i in range(1, 6):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in (np.arange(n) + i * n) % 10]
        _write_pickle(base / f"data_batch_{i}", {"batch_label": f"training batch {i} of 5", "labels": labels,
                                                  "data": data, "filenames": [f"{i}_{j}.png" for j in range(n)]})
        batches.append((data, labels))
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    _write_pickle(base / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": list(range(n_test)),
                                        "data": test, "filenames": [f"t{j}.png" for j in range(n_test)]})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _write_pickle(base / "batches.meta", {"label_names": names, "num_cases_per_batch": n, "num_vis": 3072})
    x = np.concatenate([b[0] for b in batches]).reshape(-1, 3, 32, 32)
    y = np.concatenate([b[1] for b in batches])
    return x, y, test.reshape(-1, 3, 32, 32), names


def test_cifar10_from_torchvision_layout(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    x, y, x_test, names = write_cifar10(tmp_path)
    _accept_fake_cifar(monkeypatch, CIFAR10, tmp_path)
    raw = raw_of(name="cifar10", path=str(tmp_path))
    assert raw.x_train.dtype == np.uint8 and raw.x_train.shape == (20, 32, 32, 3)  # torchvision's HWC
    assert np.array_equal(raw.x_train, x.transpose(0, 2, 3, 1)) and np.array_equal(raw.y_train, y)
    ds = build_dataset(DataConfig(name="cifar10", path=str(tmp_path)))
    assert ds.input_shape == (3, 32, 32) and ds.class_names == names and ds.augment == "crop_flip"
    assert np.array_equal(ds.test.x.numpy(), x_test) and ds.test.y.tolist() == list(range(10))
    j = ds.train.index[0].item()
    assert np.array_equal(ds.train.x[0].numpy(), x[j])
    check_split_invariants(ds, 20)


def test_cifar10_missing_or_corrupted(tmp_path):
    one_line_error(DataConfig(name="cifar10", path=str(tmp_path)), str(tmp_path), "data.download=true", "not found")
    write_cifar10(tmp_path)  # the fake files cannot match the official md5 sums
    one_line_error(DataConfig(name="cifar10", path=str(tmp_path)), "corrupted", "data.download=true")


def test_cifar100_fine_and_coarse_labels(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR100

    rng = np.random.default_rng(0)
    base = tmp_path / "cifar-100-python"
    fine_to_coarse = np.arange(100) % 20
    fine, fine_t = np.arange(200) % 100, (np.arange(20) * 7) % 100
    data = rng.integers(0, 256, (200, 3072), dtype=np.uint8)
    data_t = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
    _write_pickle(base / "train", {"filenames": [], "batch_label": "training batch 1 of 1", "fine_labels": fine.tolist(),
                                   "coarse_labels": fine_to_coarse[fine].tolist(), "data": data})
    _write_pickle(base / "test", {"filenames": [], "batch_label": "testing batch 1 of 1", "fine_labels": fine_t.tolist(),
                                  "coarse_labels": fine_to_coarse[fine_t].tolist(), "data": data_t})
    fine_names, coarse_names = [f"fine{i}" for i in range(100)], [f"coarse{i}" for i in range(20)]
    _write_pickle(base / "meta", {"fine_label_names": fine_names, "coarse_label_names": coarse_names})
    _accept_fake_cifar(monkeypatch, CIFAR100, tmp_path)
    ds = build_dataset(DataConfig(name="cifar100", path=str(tmp_path)))
    assert ds.num_classes == 100 and ds.class_names == fine_names and ds.coarse_names == coarse_names
    assert ds.fine_to_coarse == fine_to_coarse.tolist() and ds.has_coarse
    assert torch.equal(ds.train.y_coarse, ds.train.y % 20) and torch.equal(ds.test.y_coarse, ds.test.y % 20)
    assert np.array_equal(ds.test.x.numpy(), data_t.reshape(-1, 3, 32, 32))
    check_split_invariants(ds, 200)


def write_idx(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, np.uint8).tobytes())


def write_mnist_like(raw_dir, train_prefix, test_prefix, n=30, n_test=10, classes=10, first=0, transpose=False):
    rng = np.random.default_rng(0)
    out = []
    for prefix, count in ((train_prefix, n), (test_prefix, n_test)):
        x = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        x[:, 0, :] = 255  # an upright mark: the top row is white
        y = (np.arange(count) % classes + first).astype(np.uint8)
        write_idx(raw_dir / f"{prefix}-images-idx3-ubyte", x.transpose(0, 2, 1) if transpose else x)
        write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte", y)
        out.append((x, y.astype(np.int64)))
    return out


@pytest.mark.parametrize("name,folder,augment", [("mnist", "MNIST", "crop"), ("fashion_mnist", "FashionMNIST", "crop_flip")])
def test_mnist_like(tmp_path, name, folder, augment):
    (x, y), (x_t, y_t) = write_mnist_like(tmp_path / folder / "raw", "train", "t10k")
    raw = raw_of(name=name, path=str(tmp_path))
    assert np.array_equal(raw.x_train, x) and np.array_equal(raw.y_train, y) and np.array_equal(raw.x_test, x_t)
    ds = build_dataset(DataConfig(name=name, path=str(tmp_path)))
    assert ds.input_shape == (1, 28, 28) and ds.train.x.dtype == torch.uint8 and ds.num_classes == 10
    assert ds.augment == augment and len(ds.class_names) == 10
    if name == "mnist":
        assert ds.class_names == [str(i) for i in range(10)]
    check_split_invariants(ds, 30)
    one_line_error(DataConfig(name=name, path=str(tmp_path / "empty")), "empty", "data.download=true")
    f = tmp_path / folder / "raw" / "t10k-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])  # truncated
    one_line_error(DataConfig(name=name, path=str(tmp_path)), "corrupted", "data.download=true")


def test_emnist_orientation_and_letters(tmp_path):
    (x, y), _ = write_mnist_like(tmp_path / "EMNIST" / "raw", "emnist-balanced-train", "emnist-balanced-test",
                                 n=47 * 2, n_test=47, classes=47, transpose=True)
    raw = raw_of(name="emnist", path=str(tmp_path))
    assert np.array_equal(raw.x_train, x)  # stored transposed, loaded upright
    assert (raw.x_train[:, 0, :] == 255).all()
    ds = build_dataset(DataConfig(name="emnist", path=str(tmp_path)))
    assert ds.num_classes == 47 and ds.class_names[:3] == ["0", "1", "2"] and ds.augment == "crop"
    (x, y), _ = write_mnist_like(tmp_path / "EMNIST" / "raw", "emnist-letters-train", "emnist-letters-test",
                                 n=52, n_test=26, classes=26, first=1, transpose=True)
    ds = build_dataset(DataConfig(name="emnist", path=str(tmp_path), emnist_split="letters"))
    assert ds.num_classes == 26 and ds.class_names == [chr(ord("a") + i) for i in range(26)]
    assert int(ds.test.y.min()) == 0 and int(ds.test.y.max()) == 25
    one_line_error(DataConfig(name="emnist", path=str(tmp_path), emnist_split="digits"), "data.download=true")
    one_line_error(DataConfig(name="emnist", path=str(tmp_path), emnist_split="nope"), "emnist_split")


# -------------------------------------------------------------------------------------- Batcher


def _batcher(augment="crop", padding=2):
    ds = build_dataset(DataConfig(**SMALL_SYN, augment=augment, crop_padding=padding))
    return ds, Batcher(ds, ds.train, "cpu")


def _shift_candidates(clean: torch.Tensor, p: int):
    """All (2p+1)^2 shifted crops of one zero-padded (normalized) image, computed by slicing."""
    c, h, w = clean.shape
    padded = torch.zeros(c, h + 2 * p, w + 2 * p)
    padded[:, p:p + h, p:p + w] = clean
    return {(oy, ox): padded[:, oy:oy + h, ox:ox + w] for oy in range(2 * p + 1) for ox in range(2 * p + 1)}


def _match(out: torch.Tensor, clean: torch.Tensor, p: int, allow_flip: bool):
    found = []
    for (oy, ox), cand in _shift_candidates(clean, p).items():
        if torch.equal(out, cand):
            found.append((oy, ox, False))
        if allow_flip and torch.equal(out, cand.flip(2)):
            found.append((oy, ox, True))
    return found


def test_batcher_normalized_batches():
    ds, b = _batcher()
    idx = torch.arange(10)
    x, y = b.batch(idx)
    assert x.shape == (10, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    mean, std = torch.tensor(ds.mean).view(1, 3, 1, 1), torch.tensor(ds.std).view(1, 3, 1, 1)
    assert torch.allclose(x, (ds.train.x[:10].float() / 255 - mean) / std)
    assert torch.equal(y, ds.train.y[:10])
    batches = list(seeded_batches(b, EpochBatches(len(ds.train), 32, drop_last=False), seed=0, augment=False)(0))
    assert sum(len(t[1]) for t in batches) == len(ds.train)
    assert sorted(torch.cat([t[2] for t in batches]).tolist()) == list(range(len(ds.train)))
    vds = build_dataset(DataConfig(**SMALL_SYN, variant="vector"))
    vb = Batcher(vds, vds.val, "cpu")
    vx, vy = vb.batch(torch.arange(5), augment=True, generator=epoch_generator(0, 0))
    assert vx.shape == (5, 64) and torch.allclose(vx, (vds.val.x[:5] - torch.tensor(vds.mean)) / torch.tensor(vds.std))


def test_each_split_keeps_its_own_batcher():
    """``batcher_for`` keeps a split's batcher on the split: the same split and device give the
    same one, another split its own, and a split made after another is freed never gets the freed
    one's (a cache keyed by ``id(split)`` did: CPython hands the freed split's id to the next)."""
    ds = build_dataset(DataConfig(**SMALL_SYN))
    b = batcher_for(ds, ds.train, "cpu")
    assert b is batcher_for(ds, ds.train, "cpu") and b.n == len(ds.train)
    assert batcher_for(ds, ds.val, "cpu").n == len(ds.val)
    for k in range(1, 21):  # splits of 1..20 rows, each freed before the next is made
        split = Split(x=ds.train.x[:k], y=ds.train.y[:k].flip(0))
        got = batcher_for(ds, split, "cpu")
        assert got.n == k and torch.equal(got.y, ds.train.y[:k].flip(0))
        del split, got


def test_training_batches_and_inference_share_one_preprocessing():
    """The batcher (training, evaluation) and the inference API normalize with the same code and
    the same numbers: raw inputs in any accepted layout give bit-identical model inputs."""
    ds, b = _batcher()
    idx = torch.arange(12)
    x_train, _ = b.batch(idx)
    info = json.loads(json.dumps(ds.preprocessing()))  # as stored in a run's data.json
    pre = Preprocessing(info)
    raw = ds.train.x[:12]  # uint8 NCHW
    assert torch.equal(pre(raw), x_train)
    assert torch.equal(pre(raw.permute(0, 2, 3, 1).numpy()), x_train)  # NHWC numpy, as users pass it
    assert torch.equal(pre(raw[0]), x_train[:1])  # one image
    # by hand: (x / 255 - mean) / std per channel, in float32
    mean, std = torch.tensor(info["mean"]).view(1, 3, 1, 1), torch.tensor(info["std"]).view(1, 3, 1, 1)
    assert torch.equal(x_train, (raw.float() / 255 - mean) / std)
    with pytest.raises(SpecialistsError, match="expected images"):
        pre(torch.zeros(2, 5, 8, 8, dtype=torch.uint8))
    vds = build_dataset(DataConfig(**SMALL_SYN, variant="vector"))
    vpre = Preprocessing(vds.preprocessing())
    assert torch.equal(vpre(vds.val.x[:5].double().numpy()), Batcher(vds, vds.val, "cpu").batch(torch.arange(5))[0])


def test_batcher_crop_flip_reproducible_and_correct():
    ds, b = _batcher("crop_flip", padding=2)
    idx = torch.arange(48)
    x1, _ = b.batch(idx, augment=True, generator=epoch_generator(3, 1))
    x2, _ = b.batch(idx, augment=True, generator=epoch_generator(3, 1))
    x3, _ = b.batch(idx, augment=True, generator=epoch_generator(3, 2))
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    clean, _ = b.batch(idx)
    flips, shifts = [], set()
    for i in range(len(idx)):
        m = _match(x1[i], clean[i], 2, allow_flip=True)
        assert len(m) == 1, (i, m)  # exactly one shifted (maybe mirrored) crop of the padded image
        flips.append(m[0][2])
        shifts.add(m[0][:2])
    assert any(flips) and not all(flips) and len(shifts) > 5


def test_batcher_crop_never_flips_and_matches_hand_computed_shift():
    ds, b = _batcher("crop", padding=2)
    idx = torch.arange(48)
    x, _ = b.batch(idx, augment=True, generator=epoch_generator(0, 7))
    clean, _ = b.batch(idx)
    for i in range(len(idx)):
        assert len(_match(x[i], clean[i], 2, allow_flip=False)) == 1, i
        assert not any(f for *_, f in _match(x[i], clean[i], 2, allow_flip=True))
    # one example by hand: the offsets are the batcher's first two draws from its generator
    g = epoch_generator(0, 7)
    oy = torch.randint(0, 5, (48,), generator=g)[0].item()
    ox = torch.randint(0, 5, (48,), generator=g)[0].item()
    img = clean[0]
    want = torch.zeros_like(img)
    for r in range(8):
        for c in range(8):
            sr, sc = r + oy - 2, c + ox - 2  # source pixel in the unpadded image
            if 0 <= sr < 8 and 0 <= sc < 8:
                want[:, r, c] = img[:, sr, sc]
    assert torch.equal(x[0], want)
    # "none" and padding 0 leave images alone
    _, b0 = _batcher("crop", padding=0)
    assert torch.equal(b0.batch(idx, augment=True, generator=epoch_generator(0, 0))[0], clean)
    b.augment = "none"
    assert torch.equal(b.batch(idx, augment=True, generator=epoch_generator(0, 0))[0], clean)


def test_registry_lists_every_design_name():
    assert {"synthetic", "digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "emnist", "imagefolder",
            "npz"} <= set(DATASETS)
    assert all(DATASETS[n].needs_path for n in ("cifar10", "cifar100", "mnist", "fashion_mnist", "emnist",
                                                  "imagefolder", "npz"))
    assert not DATASETS["digits"].needs_path and not DATASETS["synthetic"].needs_path
