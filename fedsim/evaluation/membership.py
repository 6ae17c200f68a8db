"""Membership-inference scores: how well per-example scores separate members from non-members.

An attack gives every candidate example a score (higher = "more likely a member"); the
scorer, who alone knows `is_member`, turns them into the empirical ROC curve

    TPR(t) = #{members with score >= t} / #members,  FPR(t) = #{non-members with score >= t} / #non-members

over every threshold t (scikit-learn's `roc_curve`, no intermediate point dropped), and reads:

- `auc`: the area under it (`roc_auc_score`; 0.5 = chance, ties count half);
- `tpr_at_fpr_<f>`: the largest TPR among the curve's points with FPR <= f, for f = 1e-3 and
  1e-2 (Carlini et al. 2022: an attack is only dangerous if it is confident on some examples).
  No interpolation: with fewer than 1/f non-members the only such point may be FPR = 0;
- `balanced_accuracy`: max over t of (TPR(t) + 1 - FPR(t)) / 2, the accuracy at the best
  threshold on a balanced prior (= 1/2 + the attack's membership advantage / 2).

The best threshold is chosen on the same examples it is scored on: an upper estimate of what
an attacker who must fix the threshold in advance reaches (the same holds for TPR@FPR).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim.core.results import atomic_write_bytes, atomic_write_json

LOW_FPRS = (1e-3, 1e-2)
"""The false-positive rates at which every membership attack reports its true-positive rate."""

SUMMARY_KEYS = ("auc", "tpr_at_fpr_0.001", "tpr_at_fpr_0.01", "balanced_accuracy")
"""The membership scores a run's summary (and the sweep table) averages per attack."""


def _as_array(values: np.ndarray | torch.Tensor | list[float] | list[bool]) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


@dataclass(frozen=True)
class RocCurve:
    """The empirical ROC curve: `fpr[i]`, `tpr[i]` when guessing "member" for scores >= `thresholds[i]`.

    Starts at (0, 0) (threshold +inf) and ends at (1, 1); FPR and TPR never decrease.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    members: int
    non_members: int

    def tpr_at_fpr(self, max_fpr: float) -> float:
        """The largest TPR of a point with FPR <= `max_fpr` (no interpolation)."""
        return float(self.tpr[self.fpr <= max_fpr].max())

    def balanced_accuracy(self) -> tuple[float, float]:
        """(max over thresholds of (TPR + 1 - FPR) / 2, the threshold reaching it)."""
        accuracy = (self.tpr + 1 - self.fpr) / 2
        best = int(np.argmax(accuracy))
        return float(accuracy[best]), float(self.thresholds[best])

    def to_json(self) -> dict[str, Any]:
        return {
            "fpr": self.fpr.tolist(),
            "tpr": self.tpr.tolist(),
            # +inf (the first point) is not JSON: stored as null
            "thresholds": [None if not np.isfinite(t) else float(t) for t in self.thresholds],
            "members": self.members,
            "non_members": self.non_members,
        }


def roc(scores: np.ndarray | torch.Tensor, is_member: np.ndarray | torch.Tensor) -> RocCurve:
    """The empirical ROC curve of `scores` (higher = member) against the truth `is_member`."""
    score, truth = _check(scores, is_member)
    from sklearn.metrics import roc_curve  # not at import: sweep tables read SUMMARY_KEYS only

    fpr, tpr, thresholds = roc_curve(truth, score, drop_intermediate=False)
    return RocCurve(fpr, tpr, thresholds, int(truth.sum()), int((~truth).sum()))


def _check(scores: Any, is_member: Any) -> tuple[np.ndarray, np.ndarray]:
    score = _as_array(scores).astype(np.float64).ravel()
    truth = _as_array(is_member).astype(bool).ravel()
    if score.shape != truth.shape:
        raise ValueError(f"{score.shape[0]} scores for {truth.shape[0]} membership labels")
    if truth.all() or not truth.any():
        raise ValueError("membership scores need at least one member and one non-member")
    if not np.isfinite(score).all():
        raise ValueError("membership scores must be finite (an attack returned nan or inf)")
    return score, truth


@dataclass(frozen=True)
class MembershipScores:
    """How well an attack's scores separate members from non-members (see the module doc)."""

    auc: float
    tpr_at_fpr: dict[float, float]
    balanced_accuracy: float
    threshold: float
    curve: RocCurve

    def as_dict(self) -> dict[str, float | int]:
        """Flat JSON scores: the `SUMMARY_KEYS`, the best threshold and the example counts."""
        return {
            "auc": self.auc,
            **{f"tpr_at_fpr_{fpr:g}": tpr for fpr, tpr in self.tpr_at_fpr.items()},
            "balanced_accuracy": self.balanced_accuracy,
            "best_threshold": self.threshold,
            "members": self.curve.members,
            "non_members": self.curve.non_members,
        }


def membership_scores(
    scores: np.ndarray | torch.Tensor,
    is_member: np.ndarray | torch.Tensor,
    fprs: tuple[float, ...] = LOW_FPRS,
) -> MembershipScores:
    """ROC AUC, TPR at each of `fprs`, balanced accuracy and the curve of one attack's scores."""
    from sklearn.metrics import roc_auc_score

    curve = roc(scores, is_member)
    score, truth = _check(scores, is_member)
    accuracy, threshold = curve.balanced_accuracy()
    return MembershipScores(
        auc=float(roc_auc_score(truth, score)),
        tpr_at_fpr={fpr: curve.tpr_at_fpr(fpr) for fpr in fprs},
        balanced_accuracy=accuracy,
        threshold=threshold,
        curve=curve,
    )


def describe(scores: dict[str, Any]) -> str:
    """One line for the console: AUC, TPR at the low FPRs, balanced accuracy."""
    low = ", ".join(
        f"TPR@{fpr:.1%} FPR {scores[key]:.3f}"
        for fpr in LOW_FPRS
        if (key := f"tpr_at_fpr_{fpr:g}") in scores
    )
    return f"AUC {scores['auc']:.3f}, {low}, balanced acc {scores['balanced_accuracy']:.3f}"


def save_roc(curve: RocCurve, stem: Path, title: str) -> None:
    """Write the curve as `<stem>.json` and a log-log plot `<stem>.png` (matplotlib, Agg);
    the suffixes are appended, so a stem may contain dots (`final_model.roc`).

    Log-log axes, as Carlini et al. (2022) plot them: the low-FPR corner is what matters.
    """
    atomic_write_json(stem.with_name(stem.name + ".json"), curve.to_json())
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    floor = 1.0 / max(2 * curve.non_members, 2)  # where a log axis shows FPR = 0
    figure = Figure(figsize=(4, 4))
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    axes.plot(np.maximum(curve.fpr, floor), np.maximum(curve.tpr, floor), label="attack")
    axes.plot([floor, 1], [floor, 1], "k--", linewidth=0.8, label="chance")
    axes.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1))
    axes.set(xlabel="false-positive rate", ylabel="true-positive rate", title=title)
    axes.legend(loc="lower right")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(stem.with_name(stem.name + ".png"), buffer.getvalue())


def load_roc(path: Path) -> RocCurve:
    """A curve written by `save_roc` (its `.json`)."""
    record = json.loads(Path(path).read_text())
    thresholds = np.array([np.inf if t is None else t for t in record["thresholds"]])
    return RocCurve(
        np.array(record["fpr"]),
        np.array(record["tpr"]),
        thresholds,
        record["members"],
        record["non_members"],
    )
