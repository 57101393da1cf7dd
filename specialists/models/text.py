"""Text classifiers of token ids: ``textcnn`` (Kim 2014), ``bilstm`` and a small pre-norm ``transformer``.

Every model reads ``x``: int64 (B, L') token ids in [0, vocab_size), ``L' <= max_length``, padded on
the right with ``PAD_ID``; every row holds at least one real token, and batches are trimmed to their
longest row, so L' varies. ``features(x)`` is (B, F) float32 (also under autocast) and ignores the
padding: the same row padded to any L' gives the same features. ``model.pooling`` (mean | max over
the real tokens; None = mean) applies to bilstm and transformer; textcnn always max-pools over time.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..core.tokens import PAD_ID  # the tokenizer's padding id: rows are padded on the right with it
from ..errors import ModelError
from .classifier import Classifier
from .registry import register

POOLINGS = ("mean", "max")


def masked_pool(h: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, L', D) per-token outputs and (B, L') bool mask of real tokens -> (B, D) float32, the mean
    or max over the real tokens. In float32: a half-precision -inf fill or long sum loses precision."""
    h, m = h.float(), mask.unsqueeze(-1)
    if how == "max":
        return h.masked_fill(~m, float("-inf")).amax(dim=1)
    return h.masked_fill(~m, 0.0).sum(dim=1) / m.sum(dim=1)


def _pooling(cfg) -> str:
    how = cfg.pooling or "mean"
    if how not in POOLINGS:
        raise ModelError(f"model.pooling={how!r} is not one of {', '.join(POOLINGS)}")
    return how


class TextCNNFeatures(nn.Module):
    """Kim (2014). (B, L') ids -> (B, filters * len(kernels)) float32: embedding (B, L', dim),
    parallel ``Conv1d`` of the given widths (in tokens) with ReLU, each filter's max over the windows
    lying on real tokens (a row shorter than a width: its one window, real tokens then zeros), dropout."""

    def __init__(self, vocab_size: int, dim: int, kernels=(3, 4, 5), filters: int = 100, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=PAD_ID)
        self.convs = nn.ModuleList(nn.Conv1d(dim, filters, k) for k in kernels)
        self.dropout = nn.Dropout(dropout)
        self.out_dim = filters * len(kernels)

    def embed_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L') ids -> (B, dim, L'') embeddings with pads zeroed (L'' >= the widest kernel) and
        (B, 1) real tokens per row: the input of :func:`conv_pool` (a shared trunk's output)."""
        mask = x != PAD_ID
        lengths = mask.sum(1, keepdim=True)  # (B, 1) real tokens per row
        # zeroed pads: padding invariance must not hinge on the pad row of the embedding staying 0
        e = (self.embed(x) * mask.unsqueeze(-1)).transpose(1, 2)  # (B, dim, L')
        widest = max(c.kernel_size[0] for c in self.convs)
        if e.shape[-1] < widest:  # only short rows: make room for one window of every width
            e = nn.functional.pad(e, (0, widest - e.shape[-1]))
        return e, lengths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_pool(self.convs, self.dropout, *self.embed_tokens(x))


def conv_pool(convs: nn.ModuleList, dropout: nn.Module, e: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """TextCNN's convolutions over embeddings ``e`` (B, dim, L''), each filter's max over the
    windows lying on the ``lengths`` (B, 1) real tokens (a short row: its first window), dropout."""
    pooled = []
    for conv in convs:
        k = conv.kernel_size[0]
        h = torch.relu(conv(e)).float()  # (B, filters, windows); float32 before meeting -inf
        # window t covers tokens t..t+k-1: keep those wholly real, or the first one of a short row
        valid = torch.arange(h.shape[-1], device=e.device) <= (lengths - k).clamp(min=0)  # (B, windows)
        pooled.append(h.masked_fill(~valid.unsqueeze(1), float("-inf")).amax(dim=-1))
    return dropout(torch.cat(pooled, dim=1))


class BiLSTMFeatures(nn.Module):
    """(B, L') ids -> (B, 2 * hidden) float32: embedding, a bidirectional LSTM run on the real tokens
    only (packed, so the backward direction starts at each row's last real token), masked mean or
    max over the real tokens, dropout."""

    def __init__(self, vocab_size: int, dim: int, hidden: int, layers: int, pooling: str, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=PAD_ID)
        self.lstm = nn.LSTM(dim, hidden, layers, batch_first=True, bidirectional=True,
                            dropout=dropout if layers > 1 else 0.0)  # nn.LSTM's dropout acts between layers
        self.pooling, self.dropout = pooling, nn.Dropout(dropout)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L') ids -> (B, L', 2 * hidden) outputs [forward | backward], 0 at pads; (B, L') bool mask."""
        mask = x != PAD_ID
        return run_lstm(self.lstm, self.embed(x), mask), mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(masked_pool(*self.encode(x), self.pooling))


def run_lstm(lstm: nn.LSTM, e: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``lstm`` over embeddings ``e`` (B, L', dim) on the real tokens of ``mask`` (B, L') only (packed,
    so the backward direction starts at each row's last real token): (B, L', 2 * hidden), 0 at pads."""
    lengths = mask.sum(1).cpu()  # pack_padded_sequence wants the lengths on the CPU
    packed = pack_padded_sequence(e, lengths, batch_first=True, enforce_sorted=False)
    h, _ = pad_packed_sequence(lstm(packed)[0], batch_first=True, total_length=e.shape[1])
    return h


class TransformerFeatures(nn.Module):
    """(B, L') ids -> (B, d) float32: token + learned position embeddings (positions < max_length), a
    pre-norm ``nn.TransformerEncoder`` attending to real tokens only, a final LayerNorm, masked mean or
    max over the real tokens."""

    def __init__(self, vocab_size: int, max_length: int, d: int, layers: int, pooling: str, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d, padding_idx=PAD_ID)
        self.pos = nn.Embedding(max_length, d)
        heads = next(n for n in (4, 2, 1) if d % n == 0)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout, batch_first=True, norm_first=True)
        # pre-norm leaves the residual stream unnormalized: hence the encoder's final LayerNorm
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d), enable_nested_tensor=False)
        self.pooling = pooling

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L') ids -> (B, L', d) outputs (pad positions: meaningless, never pooled); (B, L') bool mask."""
        if x.shape[1] > self.pos.num_embeddings:
            raise ValueError(f"{x.shape[1]} tokens per row, more than max_length={self.pos.num_embeddings}")
        mask = x != PAD_ID
        h = self.embed(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        return self.encoder(h, src_key_padding_mask=~mask), mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return masked_pool(*self.encode(x), self.pooling)


@register("textcnn", text=True)
def textcnn(cfg, num_classes: int, input_shape: tuple, vocab_size: int) -> Classifier:
    """Embedding ``width`` (128); 100 filters of widths 3, 4, 5; F = 300. ``depth`` is not used."""
    if cfg.pooling not in (None, "max"):
        raise ModelError(f"model.pooling={cfg.pooling!r}: textcnn always max-pools over time (a filter detects its "
                         "n-gram wherever it occurs); leave pooling unset or 'max', or use bilstm/transformer")
    features = TextCNNFeatures(vocab_size, cfg.width or 128, dropout=cfg.dropout or 0.0)
    return Classifier(features, features.out_dim, num_classes)


@register("bilstm", text=True)
def bilstm(cfg, num_classes: int, input_shape: tuple, vocab_size: int) -> Classifier:
    """Embedding and hidden size per direction ``width`` (128), ``depth`` layers (1); F = 2 * width."""
    width = cfg.width or 128
    features = BiLSTMFeatures(vocab_size, width, width, cfg.depth or 1, _pooling(cfg), cfg.dropout or 0.0)
    return Classifier(features, 2 * width, num_classes)


@register("transformer", text=True)
def transformer(cfg, num_classes: int, input_shape: tuple, vocab_size: int) -> Classifier:
    """d_model ``width`` (128), ``depth`` layers (2), 4 heads, feed-forward 4 * d_model; F = d_model."""
    width = cfg.width or 128
    features = TransformerFeatures(vocab_size, int(input_shape[0]), width, cfg.depth or 2, _pooling(cfg),
                                   cfg.dropout or 0.0)
    return Classifier(features, width, num_classes)
