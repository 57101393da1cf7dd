"""The whole pipeline on generated text through the command line (a transformer generalist and
its specialists, distilled into a TextCNN), text inference, and a black-box API teacher served
by the test on a loopback address."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from specialists.cli import main
from specialists.data import build_dataset
from specialists.rundir import Run
from specialists.rundir.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds synchronization

TEXT = [
    "device=cpu", "seed=0", "data.name=synthetic_text", "data.num_super=3", "data.classes_per_super=3",
    "data.train_per_class=60", "data.test_per_class=30", "data.vocab_size=700", "data.max_length=24",
    "model.name=transformer", "model.width=32", "model.depth=1",
    "generalist.epochs=4", "generalist.batch_size=32", "generalist.optimizer=adamw", "generalist.lr=0.003",
    "subsets.num_specialists=3",
    "specialists.epochs=3", "specialists.batch_size=32", "specialists.optimizer=adamw", "specialists.lr=0.003",
    "student.epochs=3", "student.batch_size=32", "student.optimizer=adamw", "student.lr=0.003",
    "student.weight_decay=0", "student.model.name=textcnn", "student.model.width=32",
    "ablate.control=false", "evaluate.bootstrap=200", "evaluate.timing_batches=1",
]


def _json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """The whole pipeline on synthetic text, run through the command line (read-only: copy it)."""
    run_dir = tmp_path_factory.mktemp("text") / "run"
    assert main(["run", "configs/text_quickstart.yaml", f"run_dir={run_dir}", *TEXT]) == 0
    return run_dir


def test_the_whole_pipeline_runs_on_text_and_the_ensemble_beats_the_generalist(text_run):
    ev = _json(text_run / "evaluation" / "evaluation.json")
    assert ev["ensemble"]["top1"] > ev["generalist"]["top1"]
    st = _json(text_run / "student" / "metrics.json")
    assert st["model"]["name"] == "textcnn" and st["test_top1"] > 3 / 9  # well above chance (1/9)
    assert {"born_again", "second_generalist"} <= set(st["control"])
    # the cascade is costed on the timing sample as every model is (a text batch is as wide as
    # its longest text): the generalist on every row, the second generalist on the consulted share
    cas, f_g = st["control"]["cascade"], ev["cost"]["generalist_flops"]
    assert cas["inference_flops"] == pytest.approx(f_g * (1 + cas["consulted_fraction"]["test"]), rel=0.05)
    subsets = _json(text_run / "subsets" / "metrics.json")
    assert subsets["adjusted_rand_index"] > 0.3  # the planted topics, mostly found (chance: about 0)


def test_a_reclustering_sub_run_reads_the_generalists_very_token_ids(text_run, tmp_path):
    """The ablation's re-clustering sub-run on text, set up as the ablate stage sets it up (its
    stages are the parent's, run by tests/test_ablation.py on images; the run above has no
    ``ablate.counts``: 2.5 s of the module's time): it shares the generalist's tokenizer, so its
    generalist scores the test split exactly as the parent's evaluation recorded."""
    from specialists.data import batcher_for
    from specialists.stages.ablate import recluster_configs
    from specialists.stages.pipeline import subrun

    parent = Run(load_config(None, [f"run_dir={text_run}", *TEXT, "ablate.counts=[2]"]))
    [cfg] = recluster_configs(parent)
    assert Path(cfg.run_dir) == text_run / "ablation" / "recluster" / "M002"
    cfg.run_dir = str(tmp_path / "M002")  # (text_run is read-only)
    sub = subrun(parent, cfg, ())
    assert (sub.dir / "tokenizer.json").read_bytes() == (text_run / "tokenizer.json").read_bytes()
    assert torch.equal(sub.data.test.x, parent.data.test.x)
    model = sub.load_generalist().eval()
    with torch.no_grad():
        pred = torch.cat([model(x).argmax(1) for x, _ in batcher_for(sub.data, sub.data.test, "cpu").iterate(64)])
    top1 = float((pred == sub.data.test.y).double().mean())
    # (the stage averages in float32: 1e-6 still tells one example of 270 apart)
    assert top1 == pytest.approx(_json(text_run / "evaluation" / "evaluation.json")["generalist"]["top1"], abs=1e-6)


def test_the_cascade_is_costed_on_the_timing_sample_whatever_its_own_batches(text_run):
    """A text batch is as wide as its longest text, so FLOPs per example depend on the batches:
    the cascade is costed on the timing sample, as every other model is. Asked to cost no more
    than its first model, it consults nothing and costs exactly that model on the sample,
    although its test batches of 8 are narrower (the miscount this guards against: the Debian
    cascade once read less than its own first model)."""
    from specialists.data import batcher_for
    from specialists.engine.flops import inference_flops
    from specialists.inference import SingleModel
    from specialists.stages.student import cascade_control

    run = Run(load_config(None, [f"run_dir={text_run}", *TEXT, "student.eval_batch_size=8"]))
    ds = run.data
    first = SingleModel(run.load_generalist().eval(), run.data_info(), "cpu", 8).proba
    x_time = batcher_for(ds, ds.test, "cpu").batch(torch.arange(len(ds.test)))[0]  # one batch: the widest
    f_first = inference_flops(first, x_time, 8)
    with torch.inference_mode():
        narrow = [x for x, _ in batcher_for(ds, ds.test, "cpu").iterate(8)]
        p_first = torch.cat([first(x) for x in narrow])
    assert sum(inference_flops(first, x) * len(x) for x in narrow) / len(ds.test) < 0.99 * f_first  # 0.95x here
    c, q = cascade_control(run, first, first, f_first, f_first, f_first, p_first, x_time)
    assert c["consulted_fraction"] == {"val": 0.0, "test": 0.0} and torch.equal(q, p_first)
    assert c["inference_flops"] == f_first


def test_a_text_specialist_starts_by_ranking_its_subset_as_the_generalist_does():
    """For every text model: a specialist made from a (random) generalist orders its subset's
    classes exactly as the generalist's logits restricted to the subset."""
    from omegaconf import OmegaConf

    from specialists.core.heads import make_specialist
    from specialists.models import TEXT_MODELS, build_model
    from specialists.rundir.config import ModelConfig

    x = torch.randint(1, 50, (16, 10))
    x[:8, 6:] = 0  # padded rows too
    S = torch.tensor([1, 4, 5])
    for name in sorted(TEXT_MODELS):
        torch.manual_seed(0)
        cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name": name, "width": 16})
        g = build_model(cfg, 7, (10,), 50).eval()
        with torch.no_grad():
            spec = make_specialist(g, S, g.features(x)).eval()
            ranks = spec(x)[:, :len(S)].argsort(1)
            assert torch.equal(ranks, g(x)[:, S].argsort(1)), name


def test_predict_answers_texts_and_text_files(text_run, tmp_path, capsys):
    from specialists import SpecialistEnsemble, Student

    ds = Run(load_config(None, [f"run_dir={text_run}", *TEXT])).data
    texts = ds.test.text[:3]
    ens = SpecialistEnsemble.from_run(text_run)
    by_text = ens.predict_proba(texts)
    by_ids = ens.predict_proba(ds.test.x[:3], normalized=True)
    assert torch.allclose(by_text, by_ids, atol=1e-6)  # strings go through the run's own tokenizer
    assert Student.from_run(text_run).predict_proba(texts[0]).shape == (1, 9)
    (tmp_path / "a.txt").write_text("\n".join(texts[:2]) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": texts[2]}) + "\n")
    (tmp_path / "c.npy").write_bytes(b"")
    code = main(["predict", str(text_run), str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), str(tmp_path / "c.npy"),
                 "--text", texts[0], "--top-k", "1"])
    out, err = capsys.readouterr()
    top = [ds.class_names[int(c)] for c in by_text.argmax(1)]
    assert code == 2 and "c.npy: this run classifies texts" in err  # the bad file is one line, the others answered
    assert f"a.txt[1]:\n  1. {top[1]} " in out and f"b.jsonl:\n  1. {top[2]} " in out
    assert out.startswith("--text 1 (") and f"\n  1. {top[0]} " in out


# --- a black-box API teacher on loopback ------------------------------------------------------
class Teacher(ThreadingHTTPServer):
    """Answers 0.7 on a text's true class (the test knows them) and 0.3 spread over the others;
    counts the requests; fails with HTTP 500 from request ``fail_from`` on when set."""

    def __init__(self, labels: dict):
        self.labels, self.requests, self.fail_from = labels, 0, None

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(h):
                body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
                self.requests += 1
                if self.fail_from is not None and self.requests >= self.fail_from:
                    h.send_response(500)
                    h.end_headers()
                    return
                out = json.dumps({"probs": [answer(self.labels[t]).tolist() for t in body["inputs"]]}).encode()
                h.send_response(200)
                h.send_header("Content-Type", "application/json")
                h.send_header("Content-Length", str(len(out)))
                h.end_headers()
                h.wfile.write(out)

        super().__init__(("127.0.0.1", 0), Handler)


def answer(label: int, classes: int = 9) -> np.ndarray:
    p = np.full(classes, 0.3 / (classes - 1))
    p[label] = 0.7
    return p


@pytest.fixture()
def teacher(text_run, tmp_path, monkeypatch):
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    cfg = load_config(None, [f"run_dir={text_run}", *TEXT])
    ds = build_dataset(cfg.data)
    extra = build_dataset(load_config(None, [*TEXT, "data.split_seed=1"]).data)  # other sentences: the unlabelled
    labels = {t: int(y) for split in (ds.train, ds.val, ds.test, extra.train) for t, y in zip(split.text, split.y)}
    (tmp_path / "unlabelled.txt").write_text("\n".join(extra.train.text[:64]) + "\n")
    server = Teacher(labels)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/v1/probs", ds
    server.shutdown()


def _api(run_dir, url, *extra):
    return ["distill", "configs/text_quickstart.yaml", f"run_dir={run_dir}", *TEXT, "student.teacher=api",
            f"student.teacher_url={url}", "student.model.name=bilstm", *extra, "--force"]  # a new student: redo it


def test_an_api_teacher_trains_a_student_asks_each_input_once_and_resumes_after_a_failure(text_run, teacher, tmp_path,
                                                                                         capsys):
    server, url, ds = teacher
    run_dir = tmp_path / "run"
    shutil.copytree(text_run, run_dir)
    unlabelled = f"student.unlabelled={tmp_path / 'unlabelled.txt'}"
    n_inputs = len(ds.train) + 64 + len(ds.test)
    calls = -(-n_inputs // 64)  # batches of student.query_batch_size=64
    server.fail_from = 4
    assert main(_api(run_dir, url, unlabelled, "student.query_retries=0")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[specialists]")]
    assert len(err) == 1 and err[0].startswith("error: ") and url in err[0] and "HTTP 500" in err[0]
    cache = run_dir / "teacher_api.jsonl"
    assert len(cache.read_text().splitlines()) == 1 + 3  # the header and the 3 answered requests: kept
    assert not (run_dir / "student" / "metrics.json").exists()

    server.fail_from, server.requests = None, 0
    assert main(_api(run_dir, url, unlabelled)) == 0
    assert server.requests == calls - 3  # the rest, and nothing asked twice
    m = _json(run_dir / "student" / "metrics.json")
    api = m["teacher_api"]
    assert m["teacher"] == "api" and m["model"]["name"] == "bilstm"
    assert api["answered"] == {"train": len(ds.train), "unlabelled": 64, "test": len(ds.test)}
    assert (api["requests_this_run"], api["requests_total"]) == (calls - 3, calls)
    assert m["agreement_with_teacher"] == api["test_agreement"] > 0.25  # the API names the true class; chance 1/9
    steps = sum(h["steps"] for h in m["history"])
    assert steps == 3 * ((len(ds.train) + 64) // 32)  # the labelled and the unlabelled texts

    server.requests = 0
    assert main(_api(run_dir, url, unlabelled, "student.lr=0.002")) == 0  # a student trained anew asks nothing again
    assert server.requests == 0
    again = _json(run_dir / "student" / "metrics.json")["teacher_api"]
    assert (again["answered_from_cache"], again["requests_this_run"], again["requests_total"]) == (n_inputs, 0, calls)


def test_the_query_budget_caps_the_requests(text_run, teacher, tmp_path, capsys):
    server, url, ds = teacher
    run_dir = tmp_path / "run"
    shutil.copytree(text_run, run_dir)
    capsys.readouterr()
    assert main(_api(run_dir, url, "student.query_budget=2", "student.epochs=1")) == 0
    assert server.requests == 2
    assert capsys.readouterr().err.count("the budget of 2 requests is spent") == 1  # said once, not per reader
    api = _json(run_dir / "student" / "metrics.json")["teacher_api"]
    assert api["answered"] == {"train": 128, "unlabelled": 0, "test": 0} and api["test_agreement"] is None
