"""Black-box teacher tables: a teacher given only as probabilities over the training set.

A ``.npy`` table (N_source, C) holds one row of probabilities per example of the data set's
source training set (train + val, in the source's order; :func:`source_train_size`). It is
validated before anything is trained (:func:`load_teacher_probs`): a wrong shape, NaN/inf,
negative entries or rows not summing to 1 (within ``PROB_TOLERANCE``) stop with one line
naming the first bad row. The table is memory-mapped and checked in chunks.
"""

from __future__ import annotations

import numpy as np

from ..errors import SpecialistsError, one_line

PROB_TOLERANCE = 1e-3  # rows of a black-box table must sum to 1 within this
_CHUNK = 65536  # rows checked at a time (the file may be memory-mapped)


def source_train_size(ds) -> tuple[int, bool]:
    """Rows a black-box table must have: the size of the data set's source training set.

    Returns ``(n, exact)``: ``n = max index + 1`` over the train and val splits. It is exact
    (``exact=True``) unless ``data.max_train`` subsampled the source, in which case examples
    after the last kept one are unseen and ``n`` is only a lower bound.
    """
    idx = [s.index for s in (ds.train, ds.val) if s.index is not None and len(s.index)]
    if not idx:
        return len(ds.train) + len(ds.val), True
    n = int(max(int(i.max()) for i in idx)) + 1
    return n, n == len(ds.train) + len(ds.val)


def load_teacher_probs(path, num_rows: int, num_classes: int, exact_rows: bool = True) -> np.ndarray:
    """Open and validate a black-box teacher table; returns the (memory-mapped) array.

    Refused with one :class:`SpecialistsError` line naming the problem and the first bad row:
    not a 2-D numeric array, wrong shape (rows = ``num_rows``, the source training-set size;
    columns = ``num_classes``), a NaN or infinite entry, a negative entry, or a row whose sum is
    not 1 within ``PROB_TOLERANCE``.
    """
    where = f"student.teacher_probs {path}"
    try:
        table = np.load(path, allow_pickle=False, mmap_mode="r")
    except FileNotFoundError:
        raise SpecialistsError(f"{where}: no such file") from None
    except (ValueError, OSError, EOFError) as exc:
        raise SpecialistsError(f"{where}: not a readable .npy array ({one_line(exc, 160)})") from None
    if not isinstance(table, np.ndarray):
        raise SpecialistsError(f"{where}: expected one .npy array, not an .npz archive")
    if table.dtype == bool or not np.issubdtype(table.dtype, np.number) or np.issubdtype(table.dtype, np.complexfloating):
        raise SpecialistsError(f"{where}: dtype {table.dtype} is not a real number type (first bad row 0)")
    expected = f"({num_rows}, {num_classes})" if exact_rows else f"(>= {num_rows}, {num_classes})"
    what = "one row per training example of the data set (train + val, in its training order), one column per class"
    if table.ndim != 2:
        raise SpecialistsError(f"{where}: wrong shape {tuple(table.shape)}, expected {expected}: {what}")
    rows, cols = table.shape
    if cols != num_classes:
        raise SpecialistsError(f"{where}: wrong shape {tuple(table.shape)}, expected {expected}: "
                               f"{cols} columns for {num_classes} classes (first bad row 0)")
    if rows < num_rows or (exact_rows and rows != num_rows):
        first = min(rows, num_rows)
        why = f"row {first} is missing" if rows < num_rows else f"row {first} is one too many"
        raise SpecialistsError(f"{where}: wrong shape {tuple(table.shape)}, expected {expected}: "
                               f"{what} (first bad row {first}: {why})")
    for start in range(0, rows, _CHUNK):
        chunk = np.asarray(table[start:start + _CHUNK], dtype=np.float64)
        nonfinite = ~np.isfinite(chunk).all(1)
        negative = (chunk < 0).any(1) & ~nonfinite
        sums = chunk.sum(1)
        off = (np.abs(sums - 1.0) > PROB_TOLERANCE) & ~nonfinite & ~negative
        bad = nonfinite | negative | off
        if bad.any():
            r = int(np.argmax(bad))
            row = start + r
            if nonfinite[r]:
                col = int(np.argmax(~np.isfinite(chunk[r])))
                problem = f"a NaN or infinite entry ({chunk[r, col]} in column {col})"
            elif negative[r]:
                col = int(np.argmax(chunk[r] < 0))
                problem = f"a negative entry ({chunk[r, col]:.6g} in column {col})"
            else:
                problem = f"a sum of {sums[r]:.6g}, not 1 within {PROB_TOLERANCE:g}"
            raise SpecialistsError(f"{where}: row {row} has {problem} (first bad row {row})")
    return table
