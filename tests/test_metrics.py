"""Each metric against cases worked out by hand."""

import math

import pytest

from mllm_index.pipelines.metrics import average_precision, average_precision_at_k, precision_at_k, recall_at_k


def test_ap_trapezoid_by_hand():
    # positives a, c at positions 0 and 2: steps of 1/2 recall;
    # hit 1: precision before 1 (nothing retrieved yet), after 1/1 -> (1 + 1)/2 * 1/2 = 0.5
    # hit 2: precision before 1/2, after 2/3             -> (1/2 + 2/3)/2 * 1/2 = 0.291666...
    assert average_precision(["a", "b", "c"], {"a", "c"}) == pytest.approx(0.5 + 7 / 24)
    assert average_precision(["a", "c", "b"], {"a", "c"}) == pytest.approx(1.0)
    assert average_precision(["b", "a"], {"a"}) == pytest.approx((0 + 1 / 2) / 2)  # before: 0/1, after: 1/2


def test_ap_counts_positives_never_retrieved():
    # one of two positives found at the top: half the recall, AP 0.5
    assert average_precision(["a", "x", "y"], {"a", "z"}) == pytest.approx(0.5)
    assert average_precision(["x", "y"], {"a"}) == 0.0
    assert math.isnan(average_precision(["x"], set()))


def test_junk_is_removed_before_measuring():
    ranking = ["j1", "a", "j2", "b", "c"]
    assert average_precision(ranking, {"a", "c"}, junk={"j1", "j2"}) == pytest.approx(average_precision(["a", "b", "c"], {"a", "c"}))
    assert recall_at_k(ranking, {"a", "c"}, 2, junk={"j1", "j2"}) == 0.5  # top 2 after removal: a, b
    assert precision_at_k(ranking, {"a", "c"}, 3, junk={"j1", "j2"}) == pytest.approx(2 / 3)


def test_ilias_ap_at_k_by_hand():
    ranking = ["a", "b", "c", "d"]
    # k=2: hits a@1 -> precision 1; divided by min(2, 2 positives) = 0.5
    assert average_precision_at_k(ranking, {"a", "c"}, 2) == pytest.approx(0.5)
    # k=3: hits a@1 (1), c@3 (2/3); / min(3, 2) -> 0.8333
    assert average_precision_at_k(ranking, {"a", "c"}, 3) == pytest.approx((1 + 2 / 3) / 2)
    # k smaller than the positives: the denominator is k
    assert average_precision_at_k(ranking, {"a", "b", "c", "d", "e"}, 2) == pytest.approx((1 + 1) / 2)


def test_recall_and_precision_at_k():
    ranking = ["a", "x", "b", "y"]
    assert recall_at_k(ranking, {"a", "b", "z"}, 1) == pytest.approx(1 / 3)
    assert recall_at_k(ranking, {"a", "b", "z"}, 4) == pytest.approx(2 / 3)
    assert precision_at_k(ranking, {"a", "b"}, 4) == 0.5
    assert precision_at_k(ranking, {"a", "b"}, 10) == 0.2  # k past the end of the list still divides by k
