"""Retrieval metrics for one ranked list of gallery keys.

Conventions:
- junk keys are removed from the ranking before anything is measured (revisitop);
- positives that were never retrieved still count in the denominators;
- `average_precision` is the revisitop AP: the area under the precision-recall curve by the
  trapezoid rule, one recall step per positive;
- `average_precision_at_k` is the ILIAS mAP@k term: the sum of precision@i over the hits in
  the top k, divided by min(k, number of positives).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def without_junk(ranking: Sequence[str], junk: Iterable[str]) -> list[str]:
    junk = set(junk)
    return [key for key in ranking if key not in junk]


def hit_positions(ranking: Sequence[str], positives: set[str]) -> list[int]:
    """0-based positions of the positives in the ranking, in order."""
    return [i for i, key in enumerate(ranking) if key in positives]


def average_precision(ranking: Sequence[str], positives: Iterable[str], junk: Iterable[str] = ()) -> float:
    positives = set(positives)
    if not positives:
        return float("nan")
    ap, step = 0.0, 1.0 / len(positives)
    for found, position in enumerate(hit_positions(without_junk(ranking, junk), positives)):
        before = found / position if position > 0 else 1.0  # precision just before this hit
        after = (found + 1) / (position + 1)  # precision at this hit
        ap += (before + after) / 2 * step
    return ap


def average_precision_at_k(ranking: Sequence[str], positives: Iterable[str], k: int, junk: Iterable[str] = ()) -> float:
    positives = set(positives)
    if not positives:
        return float("nan")
    hits = hit_positions(without_junk(ranking, junk)[:k], positives)
    return sum((found + 1) / (position + 1) for found, position in enumerate(hits)) / min(k, len(positives))


def recall_at_k(ranking: Sequence[str], positives: Iterable[str], k: int, junk: Iterable[str] = ()) -> float:
    positives = set(positives)
    if not positives:
        return float("nan")
    return len(hit_positions(without_junk(ranking, junk)[:k], positives)) / len(positives)


def precision_at_k(ranking: Sequence[str], positives: Iterable[str], k: int, junk: Iterable[str] = ()) -> float:
    return len(hit_positions(without_junk(ranking, junk)[:k], set(positives))) / k
