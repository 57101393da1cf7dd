"""Your own models and weights: timm, torchvision and user factories through the pipeline,
pretrained weights from local files, and a generalist you already have (``generalist.init``).
Tiny images and one epoch: these check the plumbing, not accuracy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import tiny_config
from safetensors.torch import load_file

from specialists.core.heads import make_specialist
from specialists.data import Batcher
from specialists.errors import ConfigError, SpecialistsError
from specialists.rundir import Run
from specialists.stages.pipeline import run_stage

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["generalist.epochs=1", "specialists.epochs=1", "generalist.lr=0.01", "specialists.lr=0.01"]
RGB16 = ["data.image_size=16", "data.train_per_class=20", "data.test_per_class=10"]  # their stems want > 8x8
TV = "shufflenet_v2_x0_5"  # a small torchvision classifier with an fc head


def _metrics(d: Path, stage: str = "generalist") -> dict:
    return json.loads((d / stage / "metrics.json").read_text())


@pytest.mark.parametrize("name", ["timm:test_resnet", f"torchvision:{TV}", "python:user_code:tiny_net"])
def test_a_library_or_user_model_goes_through_the_pipeline(tmp_path, name):
    d = tmp_path / "run"
    cfg = tiny_config(d, f"model.name={name}", *FAST, *RGB16)
    for stage in ("generalist", "subsets", "specialists", "evaluate"):
        run_stage(cfg, stage)
    ev = json.loads((d / "evaluation" / "evaluation.json").read_text())
    run = Run(cfg)
    assert len(ev["per_specialist"]) == len(run.load_subsets()) >= 1
    # the recorded accuracies are the models' own: the generalist run here on the whole test
    # split, and the ensemble's saved predictions, scored against the data's labels
    gen = run.load_generalist()
    x, y = Batcher(run.data, run.data.test, "cpu").batch(torch.arange(len(run.data.test)))
    with torch.no_grad():
        g_pred = gen.eval()(x).argmax(1)
    # (the stage averages in float32: 1e-6 still tells one example of 90 apart)
    assert ev["generalist"]["top1"] == pytest.approx(float((g_pred == y).double().mean()), abs=1e-6)
    e_pred = torch.from_numpy(np.load(run.predictions("ensemble")))
    assert ev["ensemble"]["top1"] == pytest.approx(float((e_pred == y).double().mean()), abs=1e-6)
    # at step 0 a specialist ranks the classes of S exactly as its generalist does
    subset = torch.tensor(run.load_subsets()[0]["classes"])
    spec = make_specialist(gen, subset).eval()
    with torch.no_grad():
        assert torch.equal(spec(x[:20])[:, :-1].argsort(1), gen(x[:20])[:, subset].argsort(1))


def test_a_module_without_a_head_is_refused_in_one_line(tmp_path):
    with pytest.raises(SpecialistsError) as info:
        run_stage(tiny_config(tmp_path / "run", "model.name=python:user_code:headless"), "generalist")
    assert "no nn.Linear" in str(info.value) and "\n" not in str(info.value)
    for bad in ("timm:no_such_net", "torchvision:no_such_net", "python:no_such_module:f", "keras:x"):
        with pytest.raises(ConfigError, match="model.name"):
            tiny_config(tmp_path / "x", f"model.name={bad}")


def _torchvision_weights(path: Path, num_classes: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torchvision.models.get_model(TV, num_classes=num_classes)
    state = model.state_dict()
    torch.save(state, path)  # what a torchvision user writes: the library's own keys
    return state


def test_pretrained_weights_load_and_a_mismatched_head_is_reinitialized(tmp_path):
    same, other = tmp_path / "same.pt", tmp_path / "other.pth"
    lib = _torchvision_weights(same, 9, seed=5)  # not the run's seed: its own initialization differs
    _torchvision_weights(other, 1000, seed=1)
    for path, head in ((same, "loaded"), (other, "re-initialized")):
        d = tmp_path / path.stem
        cfg = tiny_config(d, f"model.name=torchvision:{TV}", f"model.pretrained={path}", "generalist.epochs=0",
                          *RGB16)
        run_stage(cfg, "generalist")
        report = _metrics(d)["pretrained"]
        assert report["head"] == head and not report["unexpected"]
        ours = load_file(str(d / "generalist" / "model.safetensors"))
        src = torch.load(path, weights_only=True)
        for k, v in src.items():  # every body tensor is the file's, exactly
            if not k.startswith("fc."):
                assert torch.equal(ours["features." + k], v), k
        assert torch.equal(ours["head.weight"], lib["fc.weight"]) == (head == "loaded")
        assert (report["missing"] == []) == (head == "loaded")


def test_bad_weights_files_are_one_line(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    unrelated = tmp_path / "unrelated.safetensors"
    from safetensors.torch import save_file

    save_file({"foo": torch.zeros(3)}, str(unrelated))
    for path, why in ((junk, "not a readable weights file"), (unrelated, "none of its 1 tensors fits")):
        with pytest.raises(SpecialistsError) as info:
            run_stage(tiny_config(tmp_path / path.stem, f"model.pretrained={path}"), "generalist")
        assert why in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="model.pretrained"):
        tiny_config(tmp_path / "x", f"model.pretrained={tmp_path / 'missing.pt'}")


def test_a_generalist_you_already_have_is_used_as_it_is(tiny_run, tmp_path):
    # one of our own checkpoints
    src = Path(tiny_run.run_dir)
    d = tmp_path / "ours"
    run_stage(tiny_config(d, f"generalist.init={src / 'generalist' / 'model.safetensors'}", "generalist.epochs=0"),
              "generalist")
    assert _metrics(d)["test_top1"] == _metrics(src)["test_top1"] and _metrics(d)["history"] == []
    # a torchvision classifier's own state dict: the test accuracy is the model's, computed here
    path = tmp_path / "torchvision.pt"
    state = _torchvision_weights(path, 9, seed=3)
    d = tmp_path / "torchvision"
    cfg = tiny_config(d, f"model.name=torchvision:{TV}", f"generalist.init={path}", "generalist.epochs=0", *RGB16)
    run_stage(cfg, "generalist")
    model = torchvision.models.get_model(TV, num_classes=9)
    model.load_state_dict(state)
    model.eval()
    run = Run(cfg)
    x, y = Batcher(run.data, run.data.test, "cpu").batch(torch.arange(len(run.data.test)))
    with torch.no_grad():
        top1 = float((model(x).argmax(1) == y).float().mean())
    assert _metrics(d)["test_top1"] == pytest.approx(top1, abs=1e-12)
    assert _metrics(d)["init"]["sha256"] and run_stage(cfg, "subsets")["num_subsets"] >= 1  # straight on
    with pytest.raises(SpecialistsError, match="does not fit"):  # a classifier for other classes
        _torchvision_weights(path, 5)
        shutil.rmtree(d)
        run_stage(tiny_config(d, f"model.name=torchvision:{TV}", f"generalist.init={path}", *RGB16), "generalist")
