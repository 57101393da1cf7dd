"""``synthetic_text``: generated sentences with planted groups of confusable classes.

The text twin of ``synthetic``: ``num_super`` topics x ``classes_per_super`` classes. Words are
made-up syllable strings (so the tokenizer has sub-words to find). Each topic owns a set of
topic words and each class a few class words; a sentence of 8 to 20 words mixes common filler
words, its topic's words, its own class words and, as noise that makes the classes of one topic
confusable, the class words of its sibling classes (more of them as ``data.difficulty`` grows).
A generalist therefore confuses classes inside a topic, which the coarse labels (the topics)
expose for scoring the clustering. Deterministic in ``data.split_seed``.
"""

from __future__ import annotations

import numpy as np

from .registry import register
from .types import RawData

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
FILLER, TOPIC_WORDS, CLASS_WORDS = 60, 10, 6  # words of each kind
LENGTHS = (8, 20)  # words per sentence, inclusive
# the share of a sentence's words of each kind, at difficulty 1: filler, topic, own class, sibling classes
MIX = np.array([0.45, 0.25, 0.18, 0.12])


def _words(rng: np.random.Generator, n: int, taken: set) -> list[str]:
    out = []
    while len(out) < n:
        w = "".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 4))))
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def _sentences(cfg, y: np.ndarray, vocab: dict, rng: np.random.Generator) -> list[str]:
    nc = cfg.classes_per_super
    mix = MIX.copy()
    mix[3] *= cfg.difficulty  # harder: more of the siblings' words, taken from the filler share
    mix[0] = max(0.05, 1 - mix[1:].sum())
    mix /= mix.sum()
    # every word of every sentence drawn at once: a kind, then a word of that kind's pool
    n, width = len(y), LENGTHS[1]
    lengths = rng.integers(LENGTHS[0], LENGTHS[1] + 1, n)
    kinds = rng.choice(4, size=(n, width), p=mix)
    # a sibling: another class of the same topic (itself when the topic has one class)
    sibling = (y // nc * nc)[:, None] + ((y % nc)[:, None] + rng.integers(1, max(nc, 2), (n, width))) % nc
    filler = rng.integers(FILLER, size=(n, width))
    topic = rng.integers(TOPIC_WORDS, size=(n, width))
    own, other = rng.integers(CLASS_WORDS, size=(2, n, width))
    words = np.asarray(vocab["filler"] + sum(vocab["topic"], []) + sum(vocab["class"], []))
    start_topic, start_class = FILLER, FILLER + len(vocab["topic"]) * TOPIC_WORDS
    ids = np.choose(kinds, [filler, start_topic + (y // nc)[:, None] * TOPIC_WORDS + topic,
                            start_class + y[:, None] * CLASS_WORDS + own, start_class + sibling * CLASS_WORDS + other])
    return [" ".join(words[row[:k]]) for row, k in zip(ids, lengths.tolist())]


@register("synthetic_text", default_augment="none", text=True, description="generated sentences with planted confusable groups")
def load_synthetic_text(cfg) -> RawData:
    ns, nc = cfg.num_super, cfg.classes_per_super
    k = ns * nc
    rng = np.random.default_rng(5000 + cfg.split_seed)
    taken: set = set()
    vocab = {"filler": _words(rng, FILLER, taken), "topic": [_words(rng, TOPIC_WORDS, taken) for _ in range(ns)],
             "class": [_words(rng, CLASS_WORDS, taken) for _ in range(k)]}
    y_tr = np.repeat(np.arange(k), cfg.train_per_class)
    y_te = np.repeat(np.arange(k), cfg.test_per_class)
    x_tr = _sentences(cfg, y_tr, vocab, np.random.default_rng(6000 + cfg.split_seed))
    x_te = _sentences(cfg, y_te, vocab, np.random.default_rng(7000 + cfg.split_seed))
    return RawData(
        x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
        class_names=[f"t{c // nc}_c{c % nc}" for c in range(k)], num_classes=k,
        y_train_coarse=y_tr // nc, y_test_coarse=y_te // nc,
        coarse_names=[f"topic{i}" for i in range(ns)], kind="text",
    )
