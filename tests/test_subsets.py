"""Confusable-class discovery (specialists.core: covariance, kmeans, subsets) and the covariance plot.

References are independent of the code under test: numpy float64 ``np.cov``, hand-computed
small cases, and a planted hierarchy whose groups the clustering must recover.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_config

from specialists.core.covariance import covariance, normalize_columns
from specialists.core.kmeans import kmeans
from specialists.core.subsets import SubsetResult, adjusted_rand_index, find_subsets, select_subsets, subset_stats
from specialists.reports.plots import plot_covariance

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def planted(groups=6, per_group=5, n=1500, seed=0):
    """Synthetic generalist probabilities with a planted hierarchy.

    Class ids are shuffled so groups are not id ranges. An example of class y puts a peak on
    y, spreads a Dirichlet share over y's group and a little Dirichlet noise over all classes.
    Returns probs (n, C) float32, labels (n,), group of each class (C,).
    """
    rng = np.random.default_rng(seed)
    c = groups * per_group
    group_of = np.empty(c, dtype=np.int64)
    group_of[rng.permutation(c)] = np.arange(c) // per_group
    y = rng.integers(0, c, n)
    probs = 0.05 * rng.dirichlet(np.ones(c), size=n)
    spread = rng.dirichlet(np.ones(per_group), size=n)
    peak = rng.uniform(0.3, 0.8, size=n)
    for i in range(n):
        members = np.flatnonzero(group_of == group_of[y[i]])
        probs[i, members] += (0.95 - peak[i]) * spread[i]
        probs[i, y[i]] += peak[i]
    return probs.astype(np.float32), y, group_of


@pytest.fixture(scope="module")
def planted_data():
    return planted()


# ----------------------------------------------------------------------------- covariance


@pytest.mark.parametrize("chunk_size", [4096, 50, 1])
def test_covariance_matches_numpy_unbiased(chunk_size):
    # Normalization: 1 / (N - 1), numpy's default (np.cov(..., bias=False)).
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(13), size=257).astype(np.float32)  # 50 does not divide 257
    ref = np.cov(p.astype(np.float64), rowvar=False)
    got = covariance(p, chunk_size=chunk_size)
    assert got.dtype == np.float32 and got.shape == (13, 13)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_covariance_bias_torch_and_memmap(tmp_path):
    rng = np.random.default_rng(2)
    p = rng.random((100, 7)).astype(np.float32)
    ref_biased = np.cov(p.astype(np.float64), rowvar=False, bias=True)
    np.testing.assert_allclose(covariance(torch.from_numpy(p), chunk_size=33, ddof=0), ref_biased, atol=1e-5, rtol=0)
    # A read-only memmap (how a pipeline would open a big probs.npy) works chunk by chunk.
    np.save(tmp_path / "p.npy", p)
    mm = np.load(tmp_path / "p.npy", mmap_mode="r")
    np.testing.assert_allclose(covariance(mm, chunk_size=30), np.cov(p.astype(np.float64), rowvar=False),
                               atol=1e-5, rtol=0)


def test_covariance_several_column_blocks_exactly_symmetric():
    # C > 1024 (several column blocks) exercises the upper-block-triangle product and the mirroring.
    rng = np.random.default_rng(3)
    p = rng.random((40, 2500)).astype(np.float32)
    got = covariance(p, chunk_size=17)
    np.testing.assert_allclose(got, np.cov(p.astype(np.float64), rowvar=False), atol=1e-5, rtol=0)
    assert np.array_equal(got, got.T)


def test_covariance_needs_two_rows():
    with pytest.raises(ValueError, match="rows"):
        covariance(np.ones((1, 3), dtype=np.float32))


# ----------------------------------------------------------------------------- normalization


def test_correlation_normalization_hand_checked():
    cov = np.array([[1.0, 0.5, -0.2, 0.0],
                    [0.5, 4.0, 0.6, 0.0],
                    [-0.2, 0.6, 9.0, 0.0],
                    [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)  # class 3 never varies
    # Correlations by hand: r01 = .5/(1*2) = .25, r02 = -.2/(1*3), r12 = .6/(2*3) = .1.
    r01, r02, r12 = 0.25, -0.2 / 3, 0.1
    corr = np.array([[0, r01, r02, 0], [r01, 0, r12, 0], [r02, r12, 0, 0], [0, 0, 0, 0]])
    expected = corr / np.where(np.linalg.norm(corr, axis=0) > 0, np.linalg.norm(corr, axis=0), 1)
    got = normalize_columns(cov, "correlation")
    assert got.dtype == np.float32 and got.shape == (4, 4)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(np.diag(got), 0)
    np.testing.assert_allclose(np.linalg.norm(got[:, :3], axis=0), 1, atol=1e-6)
    np.testing.assert_array_equal(got[:, 3], 0)  # zero-variance class: zero column, no NaN
    assert got.T.flags.c_contiguous  # rows = classes without a copy, for kmeans
    np.testing.assert_array_equal(cov, cov.T)  # input untouched


def test_raw_normalization_is_the_covariance():
    cov = np.array([[2.0, 1.0], [1.0, 3.0]], dtype=np.float32)
    np.testing.assert_array_equal(normalize_columns(cov, "raw"), cov)
    with pytest.raises(ValueError, match="kind"):
        normalize_columns(cov, "cosine")


# ----------------------------------------------------------------------------- k-means on a planted hierarchy


@pytest.mark.parametrize("method", ["faiss", "minibatch"])
def test_recovers_planted_groups(planted_data, method):
    probs, y, group_of = planted_data
    res = find_subsets(probs, y, num_specialists=6, method=method, seed=0)
    assert isinstance(res, SubsetResult)
    assert adjusted_rand_index(res.cluster_labels, group_of) >= 0.9
    assert len(res.subsets) == 6 and not res.warnings
    covered = np.concatenate(res.subsets)
    assert len(covered) == len(np.unique(covered))  # partition: a class in at most one subset
    assert res.covariance.shape == res.points.shape == (30, 30)
    assert res.size_histogram == {5: 6}
    assert (res.coverage == 1).all() and res.summary()["classes_covered"] == 30


def blocks(groups=6, per_group=5, n=600, seed=0):
    """Probabilities whose covariance has a known block structure: each example puts 90% of
    its mass on one group's classes, spread evenly (Dirichlet(50)), and 10% anywhere. Classes
    of a group rise and fall together, so their raw covariance columns are nearly equal and
    far from every other group's. Returns probs (n, C) float32 and the group of each class."""
    rng = np.random.default_rng(seed)
    c = groups * per_group
    group_of = np.empty(c, dtype=np.int64)
    group_of[rng.permutation(c)] = np.arange(c) // per_group
    g = rng.integers(0, groups, n)
    probs = 0.1 * rng.dirichlet(np.ones(c), size=n)
    for i in range(n):
        probs[i, group_of == g[i]] += 0.9 * rng.dirichlet(50 * np.ones(per_group))
    return probs.astype(np.float32), group_of


@pytest.mark.parametrize("method", ["faiss", "minibatch"])
def test_raw_normalization_recovers_known_blocks(method):
    # Raw covariance is allowed to be worse than correlation (docs/method.md, class subsets), but
    # where the blocks are plain in the covariance itself it must find them: k-means runs on the
    # covariance's columns as they are (numpy's float64 np.cov here), and recovers every block.
    probs, group_of = blocks()
    for seed in (0, 1):
        res = find_subsets(probs, None, num_specialists=6, normalize="raw", method=method, seed=seed)
        np.testing.assert_allclose(res.points, np.cov(probs.astype(np.float64), rowvar=False), atol=1e-6, rtol=0)
        assert res.cluster_labels.shape == (30,) and res.cluster_labels.dtype == np.int64
        assert adjusted_rand_index(res.cluster_labels, group_of) == 1.0
        assert sorted(sorted(group_of[s].tolist()) for s in res.subsets) == [[g] * 5 for g in range(6)]


@pytest.mark.parametrize("method", ["faiss", "minibatch"])
def test_kmeans_deterministic(planted_data, method):
    probs, _, _ = planted_data
    rows = normalize_columns(covariance(probs)).T
    a_labels, a_cent = kmeans(rows, 6, method=method, seed=3)
    b_labels, b_cent = kmeans(rows, 6, method=method, seed=3)
    np.testing.assert_array_equal(a_labels, b_labels)
    np.testing.assert_array_equal(a_cent, b_cent)
    assert a_labels.dtype == np.int64 and a_cent.dtype == np.float32 and a_cent.shape == (6, 30)


def test_kmeans_k_bounds():
    x = np.random.default_rng(0).random((5, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="k"):
        kmeans(x, 6)
    with pytest.raises(ValueError, match="k"):
        kmeans(x, 0)
    labels, cents = kmeans(x, 5, method="faiss")  # k == C: every class its own cluster
    assert sorted(labels.tolist()) == [0, 1, 2, 3, 4] and cents.shape == (5, 3)


# ----------------------------------------------------------------------------- subset selection


def test_nearest_mode_exact_sizes(planted_data):
    probs, y, _ = planted_data
    res = find_subsets(probs, y, num_specialists=6, mode="nearest", classes_per_specialist=7)
    assert len(res.subsets) >= 1
    for s in res.subsets:
        assert s.dtype == np.int64 and len(s) == 7 and np.all(np.diff(s) > 0)
    assert len({tuple(s) for s in res.subsets}) == len(res.subsets)  # no duplicates
    assert res.coverage.max() >= 1


def test_nearest_mode_drops_duplicates():
    points = np.array([[0.0], [0.1], [5.0], [5.1]], dtype=np.float32)
    labels = np.array([0, 1, 2, 2])
    centroids = np.array([[0.0], [0.05], [5.0]], dtype=np.float32)  # two centroids share {0, 1}
    subsets = select_subsets(points, labels, centroids, mode="nearest", classes_per_specialist=2)
    assert [s.tolist() for s in subsets] == [[0, 1], [2, 3]]


def _hand_clusters():
    """Points on a line. Cluster 0 = classes {0,1,2,3} around 0 (class 3 farthest), cluster 1 =
    {4} alone near 10, cluster 2 = {5,6,7} around 20."""
    points = np.array([[0.0], [0.5], [-0.5], [2.0], [10.0], [20.0], [20.5], [19.5]], dtype=np.float32)
    labels = np.array([0, 0, 0, 0, 1, 2, 2, 2])
    centroids = np.array([[0.0], [10.0], [20.0]], dtype=np.float32)
    return points, labels, centroids


def test_partition_min_size_leaves_small_cluster_to_generalist():
    points, labels, centroids = _hand_clusters()
    subsets = select_subsets(points, labels, centroids, min_size=2)
    assert [s.tolist() for s in subsets] == [[0, 1, 2, 3], [5, 6, 7]]  # class 4 in none


def test_partition_min_size_reassigns_when_asked():
    points, labels, centroids = _hand_clusters()
    # Class 4 at 10.0: centroid 0 is at distance 10, centroid 2 also 10 -> tie broken by the
    # lower centroid id; move it to 12 so the nearest kept centroid is unambiguous (2).
    points = points.copy()
    points[4] = 12.0
    subsets = select_subsets(points, labels, centroids, min_size=2, leave_unwanted=False)
    assert [s.tolist() for s in subsets] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_partition_max_size_trims_farthest():
    points, labels, centroids = _hand_clusters()
    left = select_subsets(points, labels, centroids, min_size=2, max_size=3)
    # Cluster 0 keeps its 3 nearest (0, 1, 2); class 3 (at 2.0) is left, as is class 4.
    assert [s.tolist() for s in left] == [[0, 1, 2], [5, 6, 7]]
    # Reassigning respects max_size: both kept clusters are full, so 3 and 4 stay out.
    full = select_subsets(points, labels, centroids, min_size=2, max_size=3, leave_unwanted=False)
    assert [s.tolist() for s in full] == [[0, 1, 2], [5, 6, 7]]
    # max_size=4: cluster 0 is not trimmed and is full; orphan class 4 (at 10: equally near
    # centroids 0 and 2) cannot join it and goes to cluster 2.
    roomy = select_subsets(points, labels, centroids, min_size=2, max_size=4, leave_unwanted=False)
    assert [s.tolist() for s in roomy] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_subsets_ordered_by_size_then_smallest_id():
    points = np.arange(7, dtype=np.float32)[:, None]
    labels = np.array([1, 1, 0, 0, 0, 2, 2])
    centroids = np.array([[3.0], [0.5], [5.5]], dtype=np.float32)
    subsets = select_subsets(points, labels, centroids, min_size=1)
    assert [s.tolist() for s in subsets] == [[2, 3, 4], [0, 1], [5, 6]]


# ----------------------------------------------------------------------------- coverage: overlapping subsets


def _line_of_nine():
    """9 classes on a line, 4 centroids at 0, 10, 20, 30; no two distances from one class tie.
    Nearest-first centroid order per class (by hand): 0.5, 4 -> 0 1 2 3; 6 -> 1 0 2 3;
    11, 14 -> 1 2 0 3; 17 -> 2 1 3 0; 23 -> 2 3 1 0; 26, 29.5 -> 3 2 1 0."""
    points = np.array([0.5, 4, 6, 11, 14, 17, 23, 26, 29.5], dtype=np.float32)[:, None]
    centroids = np.array([0, 10, 20, 30], dtype=np.float32)[:, None]
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 3, 3])  # the nearest centroid
    return points, labels, centroids


def _as_sets(subsets):
    return {tuple(int(i) for i in s) for s in subsets}


@pytest.mark.parametrize("c", [1, 2])
def test_coverage_puts_each_class_in_its_c_nearest_clusters(c):
    points, labels, centroids = _line_of_nine()
    subsets = select_subsets(points, labels, centroids, min_size=1, coverage=c)
    # Independent reference: numpy's argsort of the squared distances, class by class.
    d = ((points[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)  # (9, 4)
    nearest = np.argsort(d, axis=1)[:, :c]
    expected = [np.flatnonzero((nearest == j).any(1)) for j in range(4)]
    assert _as_sets(subsets) == _as_sets(expected) and len(subsets) == 4  # all four distinct here
    per_class = sum(np.isin(np.arange(9), s).astype(int) for s in subsets)
    assert per_class.tolist() == [c] * 9  # every class exactly c times
    if c == 2:  # the same, by hand from the orders in _line_of_nine
        assert [s.tolist() for s in subsets] == [[0, 1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8], [0, 1, 2], [6, 7, 8]]


def test_coverage_merges_identical_subsets():
    points, labels, centroids = _line_of_nine()
    # c = 3: clusters 1 and 2 both take all nine classes and are kept once, so every class
    # ends in 2 subsets, not 3. c = 4 = k: one subset of everything.
    three = select_subsets(points, labels, centroids, min_size=1, coverage=3)
    assert [s.tolist() for s in three] == [list(range(9)), [0, 1, 2, 3, 4], [5, 6, 7, 8]]
    assert [s.tolist() for s in select_subsets(points, labels, centroids, min_size=1, coverage=4)] == [list(range(9))]
    with pytest.raises(ValueError, match="coverage"):
        select_subsets(points, labels, centroids, coverage=5)


def test_coverage_size_rules_act_on_memberships():
    points, labels, centroids = _line_of_nine()
    # c = 2 clusters: 0 {0,1,2}, 1 {0..5}, 2 {3..8}, 3 {6,7,8}. max_size=4: cluster 1 keeps the 4
    # nearest 10 (3 at 1, 2 and 4 at 4, 1 at 6), cluster 2 the 4 nearest 20 (5, 6 at 3; 4, 7 at
    # 6); classes 0, 5, 3, 8 lose one membership and keep the other.
    capped = select_subsets(points, labels, centroids, min_size=1, max_size=4, coverage=2)
    assert [s.tolist() for s in capped] == [[1, 2, 3, 4], [4, 5, 6, 7], [0, 1, 2], [6, 7, 8]]
    # Reassigned: 5 (7 from full centroid 10, then 13 from 30) joins cluster 3; 3 (9 from full
    # 20, then 11 from 0) joins cluster 0; then everything is full: 0 and 8 stay at coverage 1.
    moved = select_subsets(points, labels, centroids, min_size=1, max_size=4, coverage=2, leave_unwanted=False)
    assert [s.tolist() for s in moved] == [[0, 1, 2, 3], [1, 2, 3, 4], [4, 5, 6, 7], [5, 6, 7, 8]]
    # min_size=4 drops clusters 0 and 3 (3 members each): coverage falls to 1 outside 3, 4, 5.
    small = select_subsets(points, labels, centroids, min_size=4, coverage=2)
    assert [s.tolist() for s in small] == [[0, 1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8]]


def test_coverage_one_is_the_partition_bit_for_bit(planted_data):
    points, labels, centroids = _hand_clusters()
    for kw in (dict(min_size=1), dict(min_size=2), dict(min_size=2, max_size=3),
               dict(min_size=2, max_size=4, leave_unwanted=False)):
        part = select_subsets(points, labels, centroids, **kw)
        one = select_subsets(points, labels, centroids, coverage=1, **kw)
        assert [s.tolist() for s in one] == [s.tolist() for s in part], kw
    assert [s.tolist() for s in select_subsets(points, labels, centroids, min_size=1, coverage=1)] == \
        [[0, 1, 2, 3], [5, 6, 7], [4]]  # the clusters as labelled
    probs, y, _ = planted_data
    a = find_subsets(probs, y, num_specialists=6)
    b = find_subsets(probs, y, num_specialists=6, coverage=1)
    assert [s.tolist() for s in a.subsets] == [s.tolist() for s in b.subsets]
    groups = {tuple(np.flatnonzero(a.cluster_labels == j)) for j in range(6)}
    assert _as_sets(b.subsets) == groups  # each k-means cluster, as it is
    assert a.stats == b.stats and a.warnings == b.warnings and np.array_equal(a.coverage, b.coverage)


def test_find_subsets_coverage_counts_and_hub_warning(planted_data):
    probs, y, _ = planted_data
    res = find_subsets(probs, y, num_specialists=6, coverage=2)
    assert res.coverage.tolist() == [2] * 30  # no size rule bites: exactly 2 each
    assert res.summary()["coverage_histogram"] == {"0": 0, "1": 0, "2": 30}
    # The planted groups are nearly orthogonal, so the second choice concentrates on few
    # centroids (docs: the hub); one subset then holds more than half the classes.
    assert max(len(s) for s in res.subsets) > 15
    assert any("coverage=2" in w and "max_size" in w for w in res.warnings)


@pytest.fixture(scope="module")
def covered_run(tiny_run, tmp_path_factory):
    """The tiny run's generalist with find-subsets redone at subsets.coverage=2 (3 clusters of
    9 classes)."""
    from specialists.stages.pipeline import run_stage

    d = tmp_path_factory.mktemp("coverage") / "run"
    shutil.copytree(tiny_run.run_dir, d, ignore=shutil.ignore_patterns("*.lock", ".locks"))
    cfg = tiny_config(d, "subsets.coverage=2")
    run_stage(cfg, "subsets", force=True)  # the copy's subsets were found without coverage
    return cfg, d


def test_find_subsets_stage_with_coverage(covered_run):
    cfg, d = covered_run
    subsets = [e["classes"] for e in json.loads((d / "subsets" / "subsets.json").read_text())["subsets"]]
    per_class = np.zeros(9, dtype=int)
    for s in subsets:
        per_class[s] += 1
    assert per_class.tolist() == [2] * 9 and len(subsets) == 3
    m = json.loads((d / "subsets" / "metrics.json").read_text())
    assert m["coverage"] == 2
    assert m["class_coverage"] == {"min": 2, "mean": 2.0, "max": 2, "histogram": {"0": 0, "1": 0, "2": 9}}
    assert "adjusted_rand_index_subsets" not in m  # overlapping subsets are no labelling


def test_table4_rows_with_overlapping_subsets(covered_run):
    # Hinton's Table 4 sorts each test example by how many specialists cover its true class:
    # with every class in exactly 2 subsets, all examples are in row 2.
    from specialists.core.scoring import score
    from specialists.rundir import Run

    cfg, d = covered_run
    subsets = [e["classes"] for e in json.loads((d / "subsets" / "subsets.json").read_text())["subsets"]]
    y = Run(cfg).data.test.y
    p = torch.nn.functional.one_hot(y.long(), 9).float() * 0.9 + 0.1 / 9  # any probabilities will do
    rows = score(p, p, y, subsets, bootstrap=0)["by_coverage"]
    assert [r["covered"] for r in rows] == [0, 1, 2, 3]
    assert [r["count"] for r in rows] == [0, 0, len(y), 0]
    assert rows[2]["generalist_correct"] == len(y)
    # and a mixed case by hand: classes 0..2 in one subset, 3..8 in two
    mixed = score(p, p, y, [[0, 1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8], [6, 7, 8]], bootstrap=0)["by_coverage"]
    n_low = int((y < 3).sum())
    assert [r["count"] for r in mixed] == [0, n_low, len(y) - n_low, 0]


def test_coverage_config_is_one_line_naming_the_key(tmp_path):
    from specialists.errors import ConfigError

    for extra in (["subsets.coverage=4"], ["subsets.coverage=0"],  # tiny: subsets.num_specialists=3
                  ["subsets.mode=nearest", "subsets.classes_per_specialist=3", "subsets.coverage=2"]):
        with pytest.raises(ConfigError) as info:
            tiny_config(tmp_path / "run", *extra)
        msg = str(info.value)
        assert "\n" not in msg and "'subsets.coverage'" in msg, msg
    assert tiny_config(tmp_path / "run", "subsets.coverage=3").subsets.coverage == 3


# ----------------------------------------------------------------------------- statistics


def test_subset_stats_hand_computed():
    probs = np.array([[0.5, 0.3, 0.1, 0.1],    # y=0, correct
                      [0.2, 0.6, 0.1, 0.1],    # y=1, correct
                      [0.1, 0.1, 0.7, 0.1],    # y=2, correct
                      [0.6, 0.1, 0.2, 0.1]],   # y=2, wrong (top-1 is class 0)
                     dtype=np.float32)
    y = np.array([0, 1, 2, 2])
    s01, s23, s3 = np.array([0, 1]), np.array([2, 3]), np.array([3])
    a, b, c = subset_stats(probs, y, [s01, s23, s3])
    # S = {0,1}: examples 0, 1. Confusion: p_1 = .3 and p_0 = .2 -> .25; outside: .2 and .2.
    assert a["size"] == 2 and a["n_examples"] == 2 and a["example_fraction"] == 0.5
    assert a["confusion_mass"] == pytest.approx(0.25)
    assert a["outside_mass"] == pytest.approx(0.2)
    assert a["subset_top1"] == 1.0 and a["routed"] == 1.0
    # S = {2,3}: examples 2, 3. Confusion: p_3 = .1 both -> .1; outside: .2 and .7 -> .45;
    # top-1 right once; example 3's top-1 (class 0) is outside S.
    assert b["n_examples"] == 2
    assert b["confusion_mass"] == pytest.approx(0.1)
    assert b["outside_mass"] == pytest.approx(0.45)
    assert b["subset_top1"] == 0.5 and b["routed"] == 0.5
    # No example of class 3: counts are zero and means are None (valid JSON null).
    assert c["n_examples"] == 0 and c["confusion_mass"] is None and c["class_fraction"] == 0.25


def test_adjusted_rand_index():
    assert adjusted_rand_index([0, 0, 1, 1, 2], [5, 5, 3, 3, 9]) == pytest.approx(1.0)
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) < 0.1


# ----------------------------------------------------------------------------- validation and warnings


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_specialists=0), "num_specialists"),
    (dict(num_specialists=31), "num_specialists"),
    (dict(num_specialists=3, mode="nearest"), "classes_per_specialist"),
    (dict(num_specialists=3, mode="nearest", classes_per_specialist=0), "classes_per_specialist"),
    (dict(num_specialists=3, mode="nearest", classes_per_specialist=31), "classes_per_specialist"),
    (dict(num_specialists=3, mode="overlap"), "mode"),
    (dict(num_specialists=3, normalize="cosine"), "normalize"),
    (dict(num_specialists=3, method="sklearn"), "method"),
    (dict(num_specialists=3, min_size=0), "min_size"),
    (dict(num_specialists=3, min_size=3, max_size=2), "max_size"),
    (dict(num_specialists=3, coverage=4), "coverage"),
    (dict(num_specialists=3, coverage=0), "coverage"),
    (dict(num_specialists=3, mode="nearest", classes_per_specialist=3, coverage=2), "coverage"),
])
def test_bad_parameters_raise_naming_them(planted_data, kwargs, name):
    probs, y, _ = planted_data
    with pytest.raises(ValueError, match=name) as info:
        find_subsets(probs[:50], y[:50], **kwargs)
    assert "\n" not in str(info.value)


def test_degenerate_warnings(planted_data, caplog):
    probs, y, _ = planted_data
    with caplog.at_level(logging.WARNING, logger="specialists.core.subsets"):
        one = find_subsets(probs, y, num_specialists=1)
    assert any("30 of 30 classes" in w for w in one.warnings)
    assert any("more than half" in r.getMessage() for r in caplog.records)
    few = find_subsets(probs, y, num_specialists=6, min_size=6)  # every group has 5 classes
    assert any("0 subsets of 6 requested" in w for w in few.warnings)
    assert few.subsets == [] and few.stats == []


# ----------------------------------------------------------------------------- plot


def test_plot_covariance_small_with_names(planted_data, tmp_path):
    probs, y, _ = planted_data
    res = find_subsets(probs, y, num_specialists=6)
    path = tmp_path / "plots" / "covariance.png"
    names = [f"class{i}" for i in range(30)]
    plot_covariance(res.points, res.subsets[:4], path, class_names=names, title="planted")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert os.listdir(path.parent) == ["covariance.png"]  # no temp file left behind


def test_plot_covariance_large_downsampled(tmp_path):
    import time

    c = 3000
    rng = np.random.default_rng(0)
    m = rng.standard_normal((c, c), dtype=np.float32)
    subsets = [np.arange(0, 500), np.arange(400, 1200), rng.choice(c, 300, replace=False)]  # overlapping
    t0 = time.perf_counter()
    plot_covariance(m, subsets, tmp_path / "big.png", max_pixels=500)
    plot_covariance(np.asfortranarray(m), subsets, tmp_path / "big_f.png")  # F-ordered input path
    assert time.perf_counter() - t0 < 30  # ~2 s on an idle 2-core machine; loose for shared CPUs
    for name in ("big.png", "big_f.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
