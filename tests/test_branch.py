"""Shared-trunk specialists (``specialists.branch``): the split of every model family, what a
specialist saves, the routed ensemble against a composition by hand, and the bad inputs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_config
from omegaconf import OmegaConf
from safetensors import safe_open

from specialists.core.combine import combine
from specialists.core.heads import make_specialist
from specialists.data import batcher_for
from specialists.errors import ConfigError, SpecialistsError
from specialists.inference import SpecialistEnsemble
from specialists.models import build_model
from specialists.models.branch import Branched, block_count, builtin_block_count, split, tail_classifier
from specialists.rundir import Run
from specialists.rundir.config import ModelConfig
from specialists.stages.pipeline import run_stage

FAMILIES = [  # (model.name, input shape, vocabulary or None, blocks)
    ("mlp", (12,), None, 2),
    ("cnn", (3, 8, 8), None, 5),
    ("resnet8", (3, 8, 8), None, 4),
    ("textcnn", (10,), 30, 1),
    ("bilstm", (10,), 30, 1),
    ("transformer", (10,), 30, 2),
    ("timm:resnet10t", (3, 16, 16), None, 4),
    ("torchvision:resnet18", (3, 16, 16), None, 8),
]


def _model_cfg(name: str, **kw):
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name": name, "width": 8, **kw})


def _inputs(shape, vocab, n=6):
    g = torch.Generator().manual_seed(1)
    if vocab:
        x = torch.randint(1, vocab, (n, *shape), generator=g)
        x[0, 4:] = 0  # a padded row
        x[1, 2:] = 0
        return x
    return torch.randn(n, *shape, generator=g)


@pytest.mark.parametrize("name,shape,vocab,blocks", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_every_family_splits_and_a_fresh_specialist_scores_its_subset_as_the_generalist(name, shape, vocab, blocks):
    """At step 0, a shared-trunk specialist's logits over S are the generalist's, for every k."""
    torch.manual_seed(0)
    gen = build_model(_model_cfg(name), 7, shape, vocab).eval()
    x = _inputs(shape, vocab)
    assert block_count(gen) == blocks
    if builtin_block_count(_model_cfg(name)) is not None:  # the config edge's table agrees with the model
        assert builtin_block_count(_model_cfg(name)) == blocks
    S = torch.tensor([1, 4, 5])
    with torch.no_grad():
        z_g = gen(x)
        for k in range(blocks + 1):
            trunk, tail = split(gen, k, x, name)
            spec = Branched(trunk, make_specialist(tail_classifier(gen, tail), S)).eval()
            z_s = spec(x)
            assert z_s.shape == (len(x), len(S) + 1)
            torch.testing.assert_close(z_s[:, :-1], z_g[:, S], rtol=1e-5, atol=1e-5)
            # the specialist owns a copy of the tail: training it cannot move the generalist
            assert not any(p is q for p in spec.parameters() for q in gen.parameters())


def test_branch_beyond_the_blocks_and_an_unsplittable_model_are_one_line():
    gen = build_model(_model_cfg("cnn"), 5, (3, 8, 8))
    with pytest.raises(SpecialistsError, match="has only 5 blocks"):
        split(gen, 6)
    with pytest.raises(ConfigError, match="specialists.branch.*has 5"):
        tiny_config("/tmp/unused", "specialists.branch=6")
    with pytest.raises(ConfigError, match="specialists.branch"):
        tiny_config("/tmp/unused", "specialists.branch=some")
    with pytest.raises(ConfigError, match="specialists.branch.*>= 0"):
        tiny_config("/tmp/unused", "specialists.branch=-1")
    with pytest.raises(ConfigError, match="cache_trunk.*needs specialists.branch"):
        tiny_config("/tmp/unused", "specialists.cache_trunk=true")
    vit = build_model(_model_cfg("timm:vit_tiny_patch16_224", width=None), 5, (3, 224, 224))
    with pytest.raises(SpecialistsError, match="cannot be split.*branch=all"):
        split(vit, 1, torch.randn(1, 3, 224, 224), "timm:vit_tiny_patch16_224")


def _last_conv(gen) -> int:
    return max(i for i, m in enumerate(gen.features) if isinstance(m, torch.nn.Conv2d))


@pytest.fixture(scope="module")
def branched_run(tiny_run, tmp_path_factory):
    """The tiny run's generalist and subsets with shared-trunk specialists (k = 1, cached trunk)."""
    dst = tmp_path_factory.mktemp("branch") / "run"
    shutil.copytree(tiny_run.run_dir, dst)
    cfg = tiny_config(dst, "specialists.branch=1", "specialists.cache_trunk=true", "specialists.epochs=1")
    run_stage(cfg, "specialists", force=True)  # records the files, as export's checks expect
    return cfg


def test_a_shared_trunk_specialist_saves_only_its_tail_and_head(branched_run):
    run = Run(branched_run)
    path = run.specialist(0).weights
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    # the generalist's keys from its last convolution on, renumbered from 0: nothing of the trunk
    gen = run.load_generalist()
    cut = _last_conv(gen)
    want = set()
    for key in gen.state_dict():
        part, i, rest = key.split(".", 2) if key.startswith("features.") else (key, None, None)
        if i is not None and int(i) >= cut:
            want.add(f"features.{int(i) - cut}.{rest}")
    assert keys == want | {"head.weight", "head.bias"}
    assert any(k.endswith("running_mean") for k in keys)  # its BatchNorm statistics are its own too
    assert meta["generalist_sha256"].strip('"') == run.generalist_sha256()
    assert meta["branch"] == "1"


def _by_hand(run, x, sids):
    """The routed ensemble composed by hand: the generalist's layers cut before its last
    convolution, each specialist's tail and head on that cut, top-1 routing, EM."""
    gen = run.load_generalist()
    layers, cut = list(gen.features), _last_conv(gen)
    with torch.no_grad():
        h = torch.nn.Sequential(*layers[:cut])(x)
        p_g = torch.softmax(gen.head(torch.nn.Sequential(*layers[cut:])(h)), 1)
        subsets, p_ms = [], []
        for sid in sids:
            spec = run.load_specialist(sid, len(run.load_subsets()[sid]["classes"]) + 1)
            p_ms.append(torch.softmax(spec.head(spec.features(h)), 1))
            subsets.append(torch.tensor(run.load_subsets()[sid]["classes"]))
        top = p_g.argmax(1)
        active = torch.stack([torch.isin(top, s) for s in subsets], 1)
        return p_g, combine(p_g, subsets, [p * a[:, None] for p, a in zip(p_ms, active.T)], active, "em")


def test_routed_ensemble_with_a_shared_trunk_equals_the_composition_by_hand(branched_run):
    run = Run(branched_run)
    ens = SpecialistEnsemble.from_run(run, specialists=[0, 1], verify=False)
    x = batcher_for(run.data, run.data.test, run.device).batch(torch.arange(40))[0]
    p_g, want = _by_hand(run, x, (0, 1))
    torch.testing.assert_close(ens.proba(x), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(ens.components(x)[0], p_g, rtol=0, atol=1e-6)


def test_a_specialist_loaded_against_another_generalist_is_one_line(branched_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(branched_run.run_dir, dst)
    run = Run(tiny_config(dst, "specialists.branch=1"))
    gen = run.load_generalist()
    with torch.no_grad():
        gen.head.bias += 1.0
    run.save_model(run.generalist.weights, gen)
    with pytest.raises(SpecialistsError, match="branched from generalist .* retrain the specialists"):
        run.load_specialist(0, len(run.load_subsets()[0]["classes"]) + 1)
    other = Run(tiny_config(branched_run.run_dir, "specialists.branch=2"))
    with pytest.raises(SpecialistsError, match="owns 1 blocks.*branch=2"):
        other.load_specialist(0, len(other.load_subsets()[0]["classes"]) + 1)


def test_the_exported_shared_trunk_ensemble_serves_the_composition_by_hand(branched_run, tmp_path):
    from specialists.inference.export import export_run
    from specialists.inference.onnx_runtime import OnnxEnsemble

    run = Run(branched_run)
    sids = [s["id"] for s in run.load_subsets()]
    export_run(branched_run.run_dir, model="ensemble", out=tmp_path)
    served = OnnxEnsemble(tmp_path)
    assert served.meta["format_version"] == 2 and (tmp_path / "trunk.onnx").is_file()
    x = batcher_for(run.data, run.data.test, run.device).batch(torch.arange(40))[0]
    h_shape = served.trunk.run(x[:2].numpy()).shape[1:]
    # each specialist's graph takes the trunk's features, not the image: it holds no trunk
    for graph in [served.generalist, *served.specialists]:
        assert tuple(graph.session.get_inputs()[0].shape[1:]) == h_shape
    _, want = _by_hand(run, x, sids)
    np.testing.assert_allclose(served.predict_proba(x.numpy(), normalized=True), want.numpy(), rtol=0, atol=1e-5)
