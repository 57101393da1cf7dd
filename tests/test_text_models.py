"""The text models (specialists.models.text): padding invariance, masked pooling and packing
against hand-computed references, learning a keyword task, the registry's text checks, heads."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from specialists.errors import ModelError, SpecialistsError
from specialists.models import PAD_ID, Classifier, build_model
from specialists.models.text import BiLSTMFeatures, TextCNNFeatures, TransformerFeatures
from specialists.rundir.config import ModelConfig, StudentModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny problems, one thread

VOCAB, MAX_LEN, CLASSES = 20, 40, 3
FEATURES = {"textcnn": TextCNNFeatures, "bilstm": BiLSTMFeatures, "transformer": TransformerFeatures}
# (name, pooling): textcnn only max-pools over time
VARIANTS = [("textcnn", None), ("bilstm", "mean"), ("bilstm", "max"), ("transformer", "mean"), ("transformer", "max")]
# rows of real tokens (no PAD_ID), lengths 1..12: shorter and longer than textcnn's widest window (5)
ROWS = [[4], [7, 1], [3, 9, 12], [5, 2, 8, 19], [6, 6, 1, 11, 17, 2, 9], [13, 4, 15, 2, 8, 10, 3, 18, 7, 5, 16, 1]]


def build(name, pooling=None, width=16, classes=CLASSES, **kw) -> Classifier:
    torch.manual_seed(0)
    cfg = OmegaConf.structured(ModelConfig(name=name, width=width, pooling=pooling, **kw))
    return build_model(cfg, classes, (MAX_LEN,), vocab_size=VOCAB)


def padded(rows, length: int) -> torch.Tensor:
    """(len(rows), length) int64 ids, each row padded on the right with PAD_ID."""
    return torch.tensor([r + [PAD_ID] * (length - len(r)) for r in rows])


@pytest.mark.parametrize("name,pooling", VARIANTS)
def test_padding_does_not_change_the_output_and_tokens_do(name, pooling):
    model = build(name, pooling).eval()
    with torch.no_grad():
        short, long = model(padded(ROWS, 12)), model(padded(ROWS, MAX_LEN))
        assert torch.allclose(short, long, atol=1e-5)
        for i, row in enumerate(ROWS):  # each row alone, unpadded: the batch's padding is invisible
            assert torch.allclose(model(torch.tensor([row])), short[i:i + 1], atol=1e-5)
        changed = [r[:-1] + [r[-1] % (VOCAB - 1) + 1] for r in ROWS]  # another real id at each last token
        moved = model(padded(changed, MAX_LEN))
    assert ((moved - long).abs().amax(dim=1) > 1e-4).all()  # so the test above cannot pass on a constant


def test_textcnn_max_pools_each_filter_over_windows_on_real_tokens():
    model = build("textcnn", width=4).eval()
    f = model.features
    rows = [ROWS[4], ROWS[1]]  # 7 tokens, and 2 (shorter than every window)
    with torch.no_grad():
        got = f(padded(rows, 9))
        for i, row in enumerate(rows):
            emb = f.embed.weight[torch.tensor(row)]  # (n, dim)
            ref = []
            for conv in f.convs:
                w, b, k = conv.weight, conv.bias, conv.kernel_size[0]  # w: (filters, dim, k)
                if len(row) >= k:  # every window of k real tokens
                    scores = [b + torch.einsum("fej,je->f", w, emb[t:t + k]) for t in range(len(row) - k + 1)]
                else:  # the one window: the real tokens, then zero vectors
                    scores = [b + torch.einsum("fej,je->f", w[:, :, :len(row)], emb)]
                ref.append(torch.stack(scores).relu().amax(dim=0))
            assert torch.allclose(got[i], torch.cat(ref), atol=1e-5)


def reference_outputs(f, row) -> torch.Tensor:
    """Per-token encoder outputs (n, D) of ``row`` alone, no padding, no mask, no packing."""
    ids = torch.tensor([row])
    if isinstance(f, BiLSTMFeatures):
        return f.lstm(f.embed(ids))[0][0]
    return f.encoder(f.embed(ids) + f.pos.weight[:len(row)])[0]


@pytest.mark.parametrize("name,pooling", [v for v in VARIANTS if v[0] != "textcnn"])
def test_masked_pooling_is_over_the_real_tokens_only(name, pooling):
    model = build(name, pooling).eval()
    with torch.no_grad():
        got = model.features(padded(ROWS, 15))
        for i, row in enumerate(ROWS):
            out = reference_outputs(model.features, row)
            ref = out.mean(dim=0) if pooling == "mean" else out.amax(dim=0)
            assert torch.allclose(got[i], ref, atol=1e-5)


def test_bilstm_backward_direction_starts_at_the_last_real_token():
    model = build("bilstm", width=8, depth=2).eval()
    f, hidden = model.features, 8
    x = padded(ROWS, 14)
    with torch.no_grad():
        h, mask = f.encode(x)
        naive = f.lstm(f.embed(x))[0]  # unpacked: the backward direction would start on the pads
        for i, row in enumerate(ROWS):
            n, ref = len(row), reference_outputs(f, row)
            assert torch.allclose(h[i, n - 1, hidden:], ref[n - 1, hidden:], atol=1e-6)
            assert torch.allclose(h[i, :n], ref, atol=1e-6)  # both directions, every real token
            assert not torch.allclose(naive[i, n - 1, hidden:], ref[n - 1, hidden:], atol=1e-3)
            assert (h[i, n:] == 0).all() and mask[i].sum() == n


def keyword_task(rows: int = 200, seed: int = 0):
    """Class c (0..2) <=> keyword id c + 1 appears (once, anywhere) among filler ids 4..19; 3..12 tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(rows, 12, dtype=torch.long)
    y = torch.randint(0, 3, (rows,), generator=g)
    for i in range(rows):
        n = int(torch.randint(3, 13, (1,), generator=g))
        x[i, :n] = torch.randint(4, VOCAB, (n,), generator=g)
        x[i, int(torch.randint(0, n, (1,), generator=g))] = y[i] + 1
    return x, y


@pytest.mark.parametrize("name,pooling", [("textcnn", None), ("bilstm", "mean"), ("transformer", "max")])
def test_each_model_learns_a_keyword_task(name, pooling):
    x, y = keyword_task()
    model = build(name, pooling, width=16, dropout=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(25):  # 10-20 steps already reach 1.0 here
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        acc = (model.eval()(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.9, f"{name}: training accuracy {acc:.2f} (chance 0.33)"


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_build_model_checks_text_and_pooling(name):
    model = build(name, width=8)
    assert isinstance(model, Classifier) and type(model.features) is FEATURES[name]
    assert model.feature_dim == {"textcnn": 300, "bilstm": 16, "transformer": 8}[name]
    with pytest.raises(SpecialistsError, match="text"):
        build_model(OmegaConf.structured(ModelConfig(name=name)), CLASSES, (MAX_LEN,))  # no vocab_size
    with pytest.raises(ModelError, match="'sum'"):
        build(name, pooling="sum")
    # a student's section leaves dropout None: no dropout
    student = OmegaConf.structured(StudentModelConfig(name=name, width=8, dropout=None))
    assert isinstance(build_model(student, CLASSES, (MAX_LEN,), vocab_size=VOCAB), Classifier)


def test_textcnn_refuses_mean_pooling_and_images_refuse_text():
    with pytest.raises(ModelError, match="textcnn always max-pools"):
        build("textcnn", pooling="mean")
    with pytest.raises(SpecialistsError, match="does not read text"):
        build_model(OmegaConf.structured(ModelConfig(name="cnn", width=8)), CLASSES, (1, 8, 8), vocab_size=VOCAB)
    with pytest.raises(ValueError, match="max_length"):
        build("transformer").features(torch.ones(1, MAX_LEN + 1, dtype=torch.long))


@pytest.mark.parametrize("name,pooling", VARIANTS)
def test_new_head_every_parameter_trained_autocast_and_seeds(name, pooling):
    model = build(name, pooling, width=8, dropout=0.2)
    model.head = nn.Linear(model.feature_dim, 5)  # what a specialist does
    x = padded(ROWS, 12)
    assert model.features(x).shape == (len(ROWS), model.feature_dim)
    torch.manual_seed(1)
    out = model(x)
    assert out.shape == (len(ROWS), 5)
    out.square().mean().backward()
    for pname, p in model.named_parameters():  # DDP runs without find_unused_parameters
        assert p.grad is not None and p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all(), pname
    again = build(name, pooling, width=8, dropout=0.2)  # the same seed: the same weights, the same dropout
    again.head = nn.Linear(again.feature_dim, 5)
    again.head.load_state_dict(model.head.state_dict())
    torch.manual_seed(1)
    assert torch.equal(again(x), out)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.features(x)
    assert feats.dtype == torch.float32 and torch.isfinite(feats).all()
    with torch.no_grad():
        assert torch.allclose(feats, model.features(x), atol=0.1, rtol=0.05)
