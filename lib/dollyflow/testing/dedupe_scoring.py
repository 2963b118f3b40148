"""Pair-level accuracy of a deduplication against a make_corpus ground-truth file (engine-free).

make_corpus (``../shared/tools/make_corpus.py``) writes one truth object per corpus line:
``{"line": n, "kind": "original"|"exact"|"near"|"bad", "cluster": int|None, ...}``; lines of one
cluster are the same record.

A deduplication is described by a *predicted clustering*: a mapping from corpus line number to a
cluster label (any hashable). Pair-level scores count unordered pairs of lines:

- true pairs: both lines in the same truth cluster;
- predicted pairs: both lines with the same predicted label;
- precision = |true ∩ predicted| / |predicted|, recall = |true ∩ predicted| / |true|, F1.

Bad lines (``kind == "bad"``) belong to no cluster: they are excluded from both sides. A non-bad
line missing from the prediction counts as a singleton (it was not deduplicated at all). A line
the prediction has but the truth calls bad is ignored. Counts come from a contingency table, so
there is no quadratic loop over pairs.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Hashable, Mapping

from dollyflow.core.records import record_id


@dataclass(frozen=True)
class PairScores:
    true_pairs: int
    predicted_pairs: int
    correct_pairs: int
    precision: float
    recall: float
    f1: float
    lines: int                 # non-bad lines scored
    merged_originals: int      # predicted clusters holding more than one truth cluster
    exact_found: int           # exact-duplicate lines sharing a predicted cluster with their original
    exact_total: int
    near_found: int            # near-duplicate lines sharing a predicted cluster with their original
    near_total: int

    def to_dict(self) -> dict:
        return asdict(self)


def read_truth(path: str | Path) -> dict[int, dict]:
    """The truth file as {line: {"kind", "cluster", ...}}."""
    out: dict[int, dict] = {}
    with open(path, encoding="utf-8") as fh:
        for text in fh:
            if text.strip():
                obj = json.loads(text)
                out[int(obj["line"])] = obj
    return out


def _pairs(n: int) -> int:
    return n * (n - 1) // 2


def score_clusters(predicted: Mapping[int, Hashable], truth: Mapping[int, dict]) -> PairScores:
    """Pair-level precision/recall/F1 of ``predicted`` (line -> label) against ``truth``."""
    truth_size: Counter = Counter()
    pred_size: Counter = Counter()
    cell: Counter = Counter()
    originals: dict[int, Hashable] = {}
    labels: dict[int, tuple] = {}
    for line, t in truth.items():
        if t.get("kind") == "bad" or t.get("cluster") is None:
            continue
        label = predicted.get(line)
        label = ("pred", label) if label is not None else ("single", line)
        labels[line] = label
        truth_size[t["cluster"]] += 1
        pred_size[label] += 1
        cell[(t["cluster"], label)] += 1
        if t.get("kind") == "original":
            originals[t["cluster"]] = label
    true_pairs = sum(_pairs(n) for n in truth_size.values())
    predicted_pairs = sum(_pairs(n) for n in pred_size.values())
    correct = sum(_pairs(n) for n in cell.values())
    precision = correct / predicted_pairs if predicted_pairs else 1.0
    recall = correct / true_pairs if true_pairs else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    clusters_per_label = Counter(label for (_, label) in cell)
    merged = sum(1 for n in clusters_per_label.values() if n > 1)
    found = {"exact": 0, "near": 0}
    total = {"exact": 0, "near": 0}
    for line, label in labels.items():
        t = truth[line]
        if t["kind"] in found:
            total[t["kind"]] += 1
            if originals.get(t["cluster"]) == label:
                found[t["kind"]] += 1
    return PairScores(true_pairs=true_pairs, predicted_pairs=predicted_pairs, correct_pairs=correct,
                      precision=precision, recall=recall, f1=f1, lines=len(labels),
                      merged_originals=merged, exact_found=found["exact"], exact_total=total["exact"],
                      near_found=found["near"], near_total=total["near"])


def line_record_ids(corpus: str | Path) -> dict[int, str]:
    """line -> record_id for every corpus line that parses to string fields, computed as ingest
    does (:func:`dollyflow.core.records.record_id`; absent context is ""). Lines that ingest
    counts as ``existing`` get the id of the earlier identical line, so they join its cluster."""
    out: dict[int, str] = {}
    with open(corpus, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                obj = json.loads(raw.decode("utf-8"))
                fields = (obj["instruction"], obj.get("context") or "", obj["response"], obj["category"])
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            if all(isinstance(f, str) for f in fields):
                out[n] = record_id(*fields)
    return out


def score_records(clusters: Mapping[str, Hashable], line_ids: Mapping[int, str],
                  truth: Mapping[int, dict]) -> PairScores:
    """Score a record-level clustering (record_id -> label; a record absent from ``clusters``
    is its own cluster) through the corpus lines' record ids."""
    predicted = {line: clusters.get(rid, rid) for line, rid in line_ids.items()}
    return score_clusters(predicted, truth)
