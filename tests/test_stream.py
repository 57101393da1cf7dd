"""Data that does not fit in memory: ``data.storage=stream`` reads examples lazily through
DataLoader workers. Tiny PNG folders written here; one epoch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from specialists.data import Batcher, EpochBatches, StreamBatcher, build_dataset, seeded_batches
from specialists.rundir import Run
from specialists.rundir.config import DataConfig
from specialists.stages.pipeline import run_all, run_stage

pytestmark = pytest.mark.usefixtures("one_thread")


def _folder(root, sizes, classes=3, per_class=8, seed=0):
    """``root/train/<c>/*.png`` and ``root/test/<c>/*.png``: colour blobs whose class shows in
    their mean colour; image i of a class has size ``sizes[i % len(sizes)]``."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", per_class // 2)):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = sizes[i % len(sizes)]
                a = rng.integers(0, 120, (h, w, 3)).astype(np.uint8)
                a[..., c] += 120
                Image.fromarray(a).save(root / split / f"c{c}" / f"{i}.png")
    return root


def _data(root, **kw) -> DataConfig:
    return DataConfig(name="imagefolder", path=str(root), **kw)


def test_auto_picks_each_storage_on_either_side_of_the_budget(tmp_path):
    root = _folder(tmp_path / "imgs", [(8, 8)])
    assert build_dataset(_data(root, memory_budget_gb=1.0)).storage == "memory"
    ds = build_dataset(_data(root, memory_budget_gb=1e-9))
    assert ds.storage == "stream" and ds.train.x is None and ds.input_shape == (3, 8, 8)
    # mixed sizes cannot be one array without a resize: streamed
    mixed = _folder(tmp_path / "mixed", [(8, 8), (13, 9), (10, 17)])
    assert build_dataset(_data(mixed, resize=8)).storage == "memory"
    ds = build_dataset(_data(mixed, storage="stream", resize=8))
    assert ds.storage == "stream" and ds.input_shape == (3, 8, 8)


def test_without_augmentation_stream_and_memory_give_the_same_batches(tmp_path):
    root = _folder(tmp_path / "imgs", [(8, 8)])
    mem = build_dataset(_data(root, storage="memory", augment="none"))
    for workers in (0, 2):
        st = build_dataset(_data(root, storage="stream", augment="none", workers=workers))
        assert st.mean == pytest.approx(mem.mean, abs=1e-7) and st.std == pytest.approx(mem.std, abs=1e-7)
        idx = torch.tensor([5, 0, 17, 3, 9])
        xm, ym = Batcher(mem, mem.train, "cpu").batch(idx)
        xs, ys = StreamBatcher(st, st.train, "cpu").batch(idx)
        torch.testing.assert_close(xs, xm, atol=1e-6, rtol=0)
        assert torch.equal(ys, ym)
        # the same through the workers, for a whole seeded epoch and the evaluation pass
        sampler = EpochBatches(len(mem.train), 4)
        a = list(seeded_batches(Batcher(mem, mem.train, "cpu"), sampler, seed=3)(0))
        b = list(seeded_batches(StreamBatcher(st, st.train, "cpu"), sampler, seed=3)(0))
        assert len(a) == len(b) == sampler.steps
        for (x1, y1, i1), (x2, y2, i2) in zip(a, b):
            assert torch.equal(i1, i2) and torch.equal(y1, y2)
            torch.testing.assert_close(x2, x1, atol=1e-6, rtol=0)
        got = torch.cat([x for x, _ in StreamBatcher(st, st.test, "cpu").iterate(5)])
        torch.testing.assert_close(got, Batcher(mem, mem.test, "cpu").batch(torch.arange(len(mem.test)))[0],
                                   atol=1e-6, rtol=0)


def test_augmented_stream_batches_do_not_depend_on_the_workers(tmp_path):
    root = _folder(tmp_path / "imgs", [(12, 12), (9, 14)])
    batches = []
    for workers in (0, 2):
        ds = build_dataset(_data(root, storage="stream", resize=8, workers=workers, augment="crop_flip"))
        sampler = EpochBatches(len(ds.train), 4)
        batches.append(list(seeded_batches(StreamBatcher(ds, ds.train, "cpu"), sampler, seed=1)(0)))
    for (x1, _, _), (x2, _, _) in zip(*batches):
        assert torch.equal(x1, x2)
    again = list(seeded_batches(StreamBatcher(ds, ds.train, "cpu"), EpochBatches(len(ds.train), 4), seed=1)(1))
    assert not torch.equal(again[0][0], batches[1][0][0])  # another epoch draws other crops


def test_every_stage_runs_on_an_imagefolder_of_mixed_sizes_streamed(tmp_path):
    root = _folder(tmp_path / "imgs", [(12, 12), (20, 15), (9, 16)], per_class=10)
    d = tmp_path / "run"
    cfg = tiny_config(d, "data.name=imagefolder", f"data.path={root}", "data.storage=stream", "data.resize=12",
                      "data.workers=2", "subsets.num_specialists=2", "generalist.epochs=2", "specialists.epochs=1",
                      "student.epochs=1", "ablate.counts=[2]")
    run_all(cfg)
    stages = json.loads((d / "manifest.json").read_text())["stages"]
    assert all(s["status"] == "done" for s in stages.values()) and len(stages) == 6
    assert Run(cfg).data.storage == "stream"
    assert json.loads((d / "data.json").read_text())["input_shape"] == [3, 12, 12]
    ev = json.loads((d / "evaluation" / "evaluation.json").read_text())
    assert ev["n"] == 15 and sum(r["count"] for r in ev["by_coverage"]) == 15


def test_a_user_data_set_is_streamed(tmp_path):
    d = tmp_path / "run"
    cfg = tiny_config(d, "data.name=python:user_code:three_classes", "subsets.num_specialists=1",
                      "generalist.epochs=1", "specialists.epochs=1", "data.workers=0")
    for stage in ("generalist", "subsets", "specialists", "evaluate"):
        run_stage(cfg, stage)
    ds = Run(cfg).data
    assert ds.storage == "stream" and ds.class_names == ["a", "b", "c"] and ds.input_shape == (3, 10, 10)
    assert json.loads((d / "evaluation" / "evaluation.json").read_text())["n"] == 30
