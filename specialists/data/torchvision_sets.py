"""torchvision's data sets, read from torchvision's own on-disk layout under ``data.path``.

``cifar10``, ``cifar100`` (fine labels, with the 20 coarse superclasses as coarse labels),
``mnist``, ``fashion_mnist`` and ``emnist`` (split ``data.emnist_split``). Nothing is fetched
unless ``data.download=true``; a missing data set is a one-line error that says where it was
looked for. The arrays are taken whole from torchvision's ``.data`` / ``.targets`` (no per-item
PIL loop). torchvision runs its own checks: the CIFAR files' md5 sums, the MNIST-style files'
presence.

EMNIST's files store every image transposed (column-major); they are turned upright here.
The ``letters`` split's labels 1..26 become 0..25 (torchvision's unused class ``N/A`` is dropped).

Default augmentation: ``crop_flip`` for CIFAR and Fashion-MNIST (a mirrored shirt or shoe is
still a shirt or shoe), ``crop`` for MNIST and EMNIST (a mirrored digit or letter is not).
"""

from __future__ import annotations

import os
import pickle
from typing import List

import numpy as np

from ..errors import SpecialistsError, one_line
from .registry import register
from .types import RawData


def _root(cfg) -> str:
    if not cfg.path:
        raise SpecialistsError(f"data set '{cfg.name}' needs data.path (the folder torchvision keeps it in; "
                               "data.download=true fetches it there)")
    return os.path.expanduser(str(cfg.path))


def _load_split(cls, cfg, expected: List[str], **kwargs):
    """Both splits of torchvision data set ``cls``; torchvision's errors become one line."""
    root = _root(cfg)
    out = []
    for train in (True, False):
        try:
            out.append(cls(root, train=train, download=bool(cfg.download) and train, **kwargs))
        except RuntimeError as e:
            present = [p for p in expected if os.path.isfile(p)]
            if cfg.download:
                raise SpecialistsError(f"{cfg.name}: could not download the data into '{root}' ({one_line(e, 300)})") from None
            if len(present) == len(expected):
                why = "their md5 sums are not the official ones" if "corrupted" in str(e) else one_line(e, 300)
                raise SpecialistsError(f"{cfg.name}: the files under '{os.path.dirname(expected[0])}' are corrupted "
                                       f"({why}); remove them and set data.download=true to fetch them again") from None
            missing = [os.path.basename(p) for p in expected if not os.path.isfile(p)]
            raise SpecialistsError(f"{cfg.name}: not found under '{root}' (looked for "
                                   f"{os.path.dirname(expected[0])}/{{{','.join(missing)}}}); "
                                   "set data.download=true to fetch it") from None
        except (OSError, ValueError, TypeError, AssertionError, EOFError, pickle.UnpicklingError) as e:
            # download failures (no network) or files that do not parse
            what = "download the data into" if cfg.download else "read the data under"
            raise SpecialistsError(f"{cfg.name}: could not {what} '{root}' ({type(e).__name__}: {one_line(e, 300)})") from None
    return out


def _arrays(ds):
    x = ds.data.numpy() if hasattr(ds.data, "numpy") else np.asarray(ds.data)
    y = ds.targets.numpy() if hasattr(ds.targets, "numpy") else np.asarray(ds.targets)
    return np.ascontiguousarray(x, dtype=np.uint8), y.astype(np.int64)


# ---------------------------------------------------------------------------------------- CIFAR


def _cifar_files(cls, root: str) -> List[str]:
    base = os.path.join(root, cls.base_folder)
    names = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return [os.path.join(base, f) for f in names]


def _unpickle(path: str) -> dict:
    # torchvision's own format for CIFAR (Python 2 pickles); read only these data set files
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


@register("cifar10", needs_path=True, default_augment="crop_flip", description="CIFAR-10 (torchvision layout)")
def load_cifar10(cfg) -> RawData:
    from torchvision.datasets import CIFAR10

    tr, te = _load_split(CIFAR10, cfg, _cifar_files(CIFAR10, _root(cfg)))
    x_tr, y_tr = _arrays(tr)
    x_te, y_te = _arrays(te)
    return RawData(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                   class_names=list(tr.classes), num_classes=len(tr.classes))


@register("cifar100", needs_path=True, default_augment="crop_flip",
          description="CIFAR-100 fine labels with the 20 superclasses as coarse labels (torchvision layout)")
def load_cifar100(cfg) -> RawData:
    from torchvision.datasets import CIFAR100

    tr, te = _load_split(CIFAR100, cfg, _cifar_files(CIFAR100, _root(cfg)))
    x_tr, y_tr = _arrays(tr)
    x_te, y_te = _arrays(te)
    # torchvision keeps only the fine labels; the coarse ones are in the same (checked) files
    base = os.path.join(_root(cfg), CIFAR100.base_folder)
    try:
        yc_tr = np.asarray(_unpickle(os.path.join(base, CIFAR100.train_list[0][0]))["coarse_labels"], np.int64)
        yc_te = np.asarray(_unpickle(os.path.join(base, CIFAR100.test_list[0][0]))["coarse_labels"], np.int64)
        coarse_names = list(_unpickle(os.path.join(base, CIFAR100.meta["filename"]))["coarse_label_names"])
    except (KeyError, TypeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise SpecialistsError(f"cifar100: cannot read the coarse labels under '{base}' ({one_line(e, 300)})") from None
    if len(yc_tr) != len(y_tr) or len(yc_te) != len(y_te):
        raise SpecialistsError(f"cifar100: coarse and fine labels under '{base}' differ in length")
    return RawData(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                   class_names=list(tr.classes), num_classes=len(tr.classes),
                   y_train_coarse=yc_tr, y_test_coarse=yc_te, coarse_names=coarse_names)


# ---------------------------------------------------------------------------------- MNIST-likes


def _mnist_files(folder: str, prefix_train: str, prefix_test: str) -> List[str]:
    return [os.path.join(folder, f"{p}-{kind}-idx{d}-ubyte")
            for p in (prefix_train, prefix_test) for kind, d in (("images", 3), ("labels", 1))]


def _mnist_like(cls, cfg, names: List[str]) -> RawData:
    root = _root(cfg)
    raw = os.path.join(root, cls.__name__, "raw")
    tr, te = _load_split(cls, cfg, _mnist_files(raw, "train", "t10k"))
    x_tr, y_tr = _arrays(tr)
    x_te, y_te = _arrays(te)
    return RawData(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                   class_names=names, num_classes=len(names))


@register("mnist", needs_path=True, default_augment="crop", description="MNIST digits (torchvision layout)")
def load_mnist(cfg) -> RawData:
    from torchvision.datasets import MNIST

    return _mnist_like(MNIST, cfg, [str(i) for i in range(10)])


@register("fashion_mnist", needs_path=True, default_augment="crop_flip", description="Fashion-MNIST (torchvision layout)")
def load_fashion_mnist(cfg) -> RawData:
    from torchvision.datasets import FashionMNIST

    return _mnist_like(FashionMNIST, cfg, list(FashionMNIST.classes))


@register("emnist", needs_path=True, default_augment="crop",
          description="EMNIST characters, split data.emnist_split (torchvision layout)")
def load_emnist(cfg) -> RawData:
    from torchvision.datasets import EMNIST

    split = str(cfg.emnist_split)
    if split not in EMNIST.splits:
        raise SpecialistsError(f"data.emnist_split: '{split}' is not one of {', '.join(EMNIST.splits)}")
    raw = os.path.join(_root(cfg), "EMNIST", "raw")
    prefix = f"emnist-{split}"
    tr, te = _load_split(EMNIST, cfg, _mnist_files(raw, f"{prefix}-train", f"{prefix}-test"), split=split)
    x_tr, y_tr = _arrays(tr)
    x_te, y_te = _arrays(te)
    # the EMNIST files hold each image transposed; make them upright like MNIST
    x_tr = np.ascontiguousarray(x_tr.transpose(0, 2, 1))
    x_te = np.ascontiguousarray(x_te.transpose(0, 2, 1))
    names = list(EMNIST.classes_split_dict[split])
    if split == "letters":  # labels 1..26; class 0 ("N/A") never occurs
        names = names[1:]
        y_tr, y_te = y_tr - 1, y_te - 1
        if min(y_tr.min(initial=0), y_te.min(initial=0)) < 0:
            raise SpecialistsError(f"emnist: the letters files under '{raw}' hold label 0, expected 1..26")
    return RawData(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                   class_names=names, num_classes=len(names))
