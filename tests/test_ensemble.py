"""The inference API on the tiny trained run: routing, components, errors, input layouts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from specialists.combine import combine
from specialists.data import Batcher
from specialists.errors import SpecialistsError
from specialists.inference import SingleModel, SpecialistEnsemble
from specialists.rundir import Run

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny problems, one thread


@pytest.fixture(scope="module")
def run_dir(tiny_run) -> Path:
    return Path(tiny_run.run_dir)


@pytest.fixture(scope="module")
def data(run_dir):
    """(dataset, test split) of the tiny run (read only)."""
    ds = Run.open(run_dir, "cpu").data
    return ds, ds.test


@pytest.fixture(scope="module")
def ens(run_dir) -> SpecialistEnsemble:
    return SpecialistEnsemble.from_run(run_dir, device="cpu")


@pytest.fixture(scope="module")
def ens_all(run_dir) -> SpecialistEnsemble:
    return SpecialistEnsemble.from_run(run_dir, device="cpu", routing="all")


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def test_routed_equals_all_when_every_specialist_is_active(run_dir, data, ens_all):
    ds, test = data
    x = test.x
    C = ds.num_classes
    routed_everything = SpecialistEnsemble.from_run(run_dir, device="cpu", top_n=C)  # any class -> all active
    all_routing = ens_all
    out = routed_everything.predict_all(x)
    assert out["active"].all()
    assert torch.equal(out["ensemble"], all_routing.predict_proba(x))


def test_routed_q_equals_all_routing_components_on_the_same_active_sets(ens, ens_all, data):
    """Top-1 routing: combining the `all` ensemble's specialist outputs with the routed active
    sets gives the routed q, so routing changes which rows run, not what they compute."""
    _, test = data
    x = ens.preprocess(test.x)
    all_routing = ens_all
    with torch.inference_mode():
        p_g, p_routed, active = ens.components(x)
        p_g_all, p_all, active_all = all_routing.components(x)
        q = ens.combine(p_g, p_routed, active)
        q_from_all = combine(p_g_all, ens.table, p_all, active, ens.solver, max_iter=ens.max_iter, tol=ens.tol)
    assert active_all.all()
    assert not active.all() and active.any()  # a real routing: some rows skip some specialists
    assert torch.equal(p_g, p_g_all)
    for m in range(len(p_routed)):
        rows = active[:, m]
        torch.testing.assert_close(p_routed[m][rows], p_all[m][rows], atol=1e-5, rtol=1e-5)
        assert (p_routed[m][~rows] == 0).all()  # rows it did not run on hold zeros
    torch.testing.assert_close(q, q_from_all, atol=1e-5, rtol=1e-5)


def test_each_specialist_runs_only_on_its_routed_rows(run_dir, data):
    _, test = data
    ens = SpecialistEnsemble.from_run(run_dir, device="cpu")
    seen: dict[int, list[torch.Tensor]] = {m: [] for m in range(len(ens.specialists))}
    hooks = [s.register_forward_pre_hook(lambda mod, args, m=m: seen[m].append(args[0].clone()))
             for m, s in enumerate(ens.specialists)]
    x = ens.preprocess(test.x)
    with torch.inference_mode():
        p_g, p_specs, active = ens.components(x)
    for h in hooks:
        h.remove()
    assert (active.sum(1) >= 1).all() and active.sum(0).min() < len(x)
    for m in range(len(ens.specialists)):
        rows = active[:, m]
        if rows.any():
            assert len(seen[m]) == 1, "one forward per specialist per batch"
            assert torch.equal(seen[m][0], x[rows])  # exactly its routed rows, in order
            with torch.inference_mode():
                full = torch.softmax(ens.specialists[m](x).float(), 1)  # the specialist on the whole batch
            torch.testing.assert_close(p_specs[m][rows], full[rows], atol=1e-5, rtol=1e-5)
        else:
            assert seen[m] == []


def test_all_routing_runs_every_specialist_on_every_row(ens_all, data):
    _, test = data
    ens = ens_all
    sizes = []
    hooks = [s.register_forward_pre_hook(lambda mod, args: sizes.append(len(args[0]))) for s in ens.specialists]
    ens.predict_proba(test.x[:50])
    for h in hooks:
        h.remove()
    assert sizes == [50] * len(ens.specialists)


def test_no_active_specialist_gives_the_generalist_bit_for_bit(run_dir, ens, data):
    _, test = data
    one = SpecialistEnsemble.from_run(run_dir, device="cpu", specialists=[ens.ids[0]])
    out = one.predict_all(test.x)
    none = ~out["active"].any(1)
    assert none.any() and (~none).any()
    assert torch.equal(out["ensemble"][none], out["generalist"][none])
    assert not torch.equal(out["ensemble"][~none], out["generalist"][~none])


def _one_line_error(fn) -> str:
    with pytest.raises(SpecialistsError) as err:
        fn()
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


def test_from_run_missing_specialist(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    (d / "specialists" / "001" / "metrics.json").unlink()
    msg = _one_line_error(lambda: SpecialistEnsemble.from_run(d, device="cpu"))
    assert "[1]" in msg and "train-specialists" in msg
    # the other specialists alone still load
    assert SpecialistEnsemble.from_run(d, device="cpu", specialists=[0, 2]).ids == [0, 2]


def test_from_run_class_count_mismatch_in_data_json(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    info = json.loads((d / "data.json").read_text())
    info["num_classes"] += 1
    info["class_names"].append("extra")
    (d / "data.json").write_text(json.dumps(info))
    msg = _one_line_error(lambda: SpecialistEnsemble.from_run(d, device="cpu"))
    assert "data.json" in msg and "changed" in msg  # the edited file is refused as such
    msg = _one_line_error(lambda: SpecialistEnsemble.from_run(d, device="cpu", verify=False))
    assert "do not fit" in msg or "classes" in msg  # unverified, the class count check still catches it


def test_from_run_subset_naming_a_class_the_run_lacks(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    path = d / "subsets" / "subsets.json"
    subsets = json.loads(path.read_text())
    C = json.loads((d / "data.json").read_text())["num_classes"]
    subsets["subsets"][0]["classes"] = subsets["subsets"][0]["classes"][:-1] + [C]
    path.write_text(json.dumps(subsets))
    assert "subsets.json" in _one_line_error(lambda: SpecialistEnsemble.from_run(d, device="cpu"))
    msg = _one_line_error(lambda: SpecialistEnsemble.from_run(d, device="cpu", verify=False))
    assert f"class {C}" in msg


def test_from_run_subset_size_not_matching_the_specialist(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    path = d / "subsets" / "subsets.json"
    subsets = json.loads(path.read_text())
    subsets["subsets"][1]["classes"] = subsets["subsets"][1]["classes"][:-1]  # one class fewer than its head
    path.write_text(json.dumps(subsets))
    assert "subsets.json" in _one_line_error(lambda: SpecialistEnsemble.from_run(d, device="cpu"))
    _one_line_error(lambda: SpecialistEnsemble.from_run(d, device="cpu", verify=False))


def test_from_run_not_a_run_dir(tmp_path):
    msg = _one_line_error(lambda: SpecialistEnsemble.from_run(tmp_path / "nothing", device="cpu"))
    assert "not a run directory" in msg


def test_predict_proba_raw_nhwc_nchw_and_normalized_agree(ens, data):
    ds, test = data
    idx = torch.arange(0, len(test), 7)
    nchw = test.x[idx]  # uint8 (N, C, H, W), as the data set stores images
    nhwc = nchw.permute(0, 2, 3, 1).numpy()  # uint8 (N, H, W, C), as a user would load them
    normalized, _ = Batcher(ds, test, "cpu").batch(idx)
    q_nchw = ens.predict_proba(nchw)
    torch.testing.assert_close(ens.predict_proba(nhwc), q_nchw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ens.predict_proba(normalized, normalized=True), q_nchw, atol=1e-5, rtol=1e-5)
    gen = SingleModel(ens.generalist, ens.info, ens.device)
    torch.testing.assert_close(gen.predict_proba(nhwc), gen.predict_proba(normalized, normalized=True),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(SpecialistsError):
        ens.predict_proba(np.zeros((2, 5, 5, 3), np.uint8))  # wrong image size: one clear line


def test_explain_structure(ens, data):
    _, test = data
    x = test.x[:6]
    k = 3
    ex = ens.explain(x, k=k)
    q = ens.predict_proba(x)
    with torch.inference_mode():
        p_g, _, active = ens.components(ens.preprocess(x))
    assert len(ex) == len(x)
    for b, e in enumerate(ex):
        assert set(e) >= {"generalist", "specialists", "ensemble"}
        assert [t["class"] for t in e["ensemble"]] == q[b].topk(k).indices.tolist()
        assert [t["prob"] for t in e["ensemble"]] == pytest.approx(q[b].topk(k).values.tolist(), abs=1e-6)
        assert [t["class"] for t in e["generalist"]] == p_g[b].topk(k).indices.tolist()
        assert all(t["name"] == ens.class_names[t["class"]] for t in e["ensemble"] + e["generalist"])
        assert [s["id"] for s in e["specialists"]] == [ens.ids[m] for m in torch.nonzero(active[b]).flatten().tolist()]
        for s in e["specialists"]:
            m = ens.ids.index(s["id"])
            subset = set(ens.subsets[m].tolist())
            assert s["size"] == len(subset)
            assert {t["class"] for t in s["top"]} <= subset
            assert 0.0 <= s["dustbin"] <= 1.0
            assert sum(t["prob"] for t in s["top"]) + s["dustbin"] <= 1.0 + 1e-5
