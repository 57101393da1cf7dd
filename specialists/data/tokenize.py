"""Text -> token ids: one :class:`TextEncoder` for the training batches and for inference.

The vocabulary is a byte-level BPE (default) or a WordPiece model of the ``tokenizers`` library
trained on the training split only (``data.tokenizer=bpe|wordpiece``, ``data.vocab_size``), or
the user's own ``tokenizer.json`` (``data.tokenizer=PATH``). A run saves it as
``RUN_DIR/tokenizer.json`` and every stage and every inference of the run reads that file, so
the ids a model was trained on are the ids it serves on. (BPE training is reproducible: the
same texts give the same vocabulary. WordPiece training breaks ties at the vocabulary's edge in
an arbitrary order, so two trainings can differ by a few tokens; a run reuses its own.)

Ids: the model input is int64 ``(N, L)``, ``L <= data.max_length``, padded on the right with
``PAD_ID = 0``. A tokenizer whose id 0 is its padding token (ours: ``[PAD]``) is used as it
is; any other (a user's, whose 0 may be a real token) has every id shifted by one, so 0 is
free for padding. A text whose tokens are all cut or unknown still gets one token (``[UNK]``,
or the first id): a row of only padding would have nothing to pool.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.tokens import PAD_ID
from ..errors import SpecialistsError, one_line

TOKENIZERS = ("bpe", "wordpiece")  # data.tokenizer: trained on the training split (or a tokenizer.json path)
SPECIAL_TOKENS = ["[PAD]", "[UNK]"]  # in this order: [PAD] is id 0
PAD_TOKENS = ("[PAD]", "<pad>")
UNSEEN = "zqxj \u2603\U0001f600"  # a text of words outside any real vocabulary (a probe)


def _train(kind: str, vocab_size: int, texts: Sequence[str]):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)  # NFD, accents stripped, lowercase
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    else:  # byte-level BPE: every byte is in the alphabet, so nothing is unknown
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


class TextEncoder:
    """A ``tokenizers.Tokenizer`` and the run's id conventions.

    ``encode(texts)`` -> int64 (N, L) padded with ``PAD_ID``; ``vocab_size``: the model's
    embedding rows (the tokenizer's size, plus one when ids are shifted).
    """

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        pads = [t for t in PAD_TOKENS if tokenizer.token_to_id(t) == PAD_ID]
        self.shift = 0 if pads else 1
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True) + self.shift
        unk = tokenizer.token_to_id("[UNK]")
        self.fallback = (unk if unk is not None else 0) + self.shift  # the one token of an empty encoding
        tokenizer.no_padding()
        tokenizer.enable_truncation(self.max_length)

    @classmethod
    def train(cls, kind: str, vocab_size: int, texts: Sequence[str], max_length: int) -> "TextEncoder":
        return cls(_train(kind, vocab_size, texts), max_length)

    @classmethod
    def from_json(cls, text: str, max_length: int, where: str = "tokenizer") -> "TextEncoder":
        from tokenizers import Tokenizer

        try:
            encoder = cls(Tokenizer.from_str(text), max_length)
        except Exception as exc:  # the tokenizers library raises plain Exceptions for bad JSON
            raise SpecialistsError(f"{where}: not a tokenizer.json of the tokenizers library ({one_line(exc)})") from None
        try:  # words no vocabulary holds: a tokenizer without an unknown token fails on them
            encoder.tokenizer.encode(UNSEEN, add_special_tokens=False)
        except Exception as exc:
            raise SpecialistsError(f"{where}: cannot encode a word outside its vocabulary ({one_line(exc)}); "
                                   "give its model an unknown token that is in its vocabulary") from None
        return encoder

    @classmethod
    def from_file(cls, path, max_length: int) -> "TextEncoder":
        path = Path(path).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecialistsError(f"data.tokenizer {path}: cannot read it ({one_line(exc)})") from None
        return cls.from_json(text, max_length, f"data.tokenizer {path}")

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    def encode(self, texts: Sequence[str], pad_to: int | None = None) -> np.ndarray:
        """Texts -> int64 (N, L): ``L = pad_to`` (default: the longest encoding), at most
        ``max_length`` tokens each, padded on the right with ``PAD_ID``."""
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        rows = [np.asarray(e.ids, np.int64) + self.shift if e.ids else np.asarray([self.fallback]) for e in encodings]
        width = pad_to or max((len(r) for r in rows), default=1)
        out = np.full((len(rows), width), PAD_ID, np.int64)
        for i, r in enumerate(rows):
            out[i, :len(r)] = r[:width]
        return out


def texts_sha256(texts: Sequence[str]) -> str:
    """A fingerprint of a list of texts (what a trained tokenizer was trained on)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()
