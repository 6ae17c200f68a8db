"""The results table of a sweep: one row per cell, read from the files of its run directory.

Columns: `cell`, `index` (the combination of axis values, shared by its seeds), `seed`, one
column per swept field (named by its dotted path; lists and mappings as JSON text), `status`
(done | failed | pending), utility (`final_test_accuracy`, `best_test_accuracy`), privacy
(one column per kind of guarantee, never mixed on one axis: `epsilon_example` (DP-SGD, DP-GD,
DIFF2), `epsilon_client` (central DP), `epsilon_local` (local DP), `epsilon_unstated` (a
defense that states no unit), each with a text column `epsilon_<kind>_unit` naming level,
relation, delta, accountant and defense; see `fedsim.core.privacy`), leakage per attack
(`<attack>_psnr`, `<attack>_ssim`, `<attack>_label_accuracy`,
means over the attacked observations; membership attacks: `<attack>_auc`,
`<attack>_tpr_at_fpr_0.001`, `<attack>_tpr_at_fpr_0.01`, `<attack>_balanced_accuracy`, and for
audits `<attack>_epsilon_lower_bound`), what those numbers mean as the run's summary states it
(`MEANING`: counts recovered against the SSIM threshold, zero-knowledge baselines, chance; and
`<attack>_leaked`, the kinds of leak flagged, e.g. "images; labels", or "none"), `wall_time_s`
(training plus attacks) and `run_dir`.

Every number is read back from the run directory, never from memory, so a resumed sweep
and a fresh one give the same table.
"""

from __future__ import annotations

import io
import json
import numbers
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsim.core.errors import UserError
from fedsim.core.privacy import KINDS, by_kind
from fedsim.core.results import RunDirectory, atomic_write_bytes, read_record
from fedsim.evaluation.membership import SUMMARY_KEYS as MEMBERSHIP_SCORES

if TYPE_CHECKING:  # pandas where a table is built: `fedsim sweep --dry-run` needs none
    import pandas as pd

MANIFEST = "cells.json"
"""Written by `fedsim sweep` into the sweep directory: its axes and cells, in order."""
ERROR_FILE = "error.txt"
"""Written into a cell's run directory when the cell failed (removed when it is retried)."""
LEAKAGE = ("psnr", "ssim", "label_accuracy")
"""Image leakage scores of gradient attacks (the report plots these)."""
MODEL_LEAKAGE = ("top1_accuracy", "top5_accuracy", "knn_distance")
"""Evaluation-classifier scores of model-inversion attacks (the report plots these too)."""
MEMBERSHIP = (*MEMBERSHIP_SCORES, "epsilon_lower_bound", "gaussian_epsilon_bound")
"""Membership-inference scores and the audits' empirical epsilon lower bounds (one-run; and
the Gaussian-trade-off bound of audits on independent canaries)."""
MEANING = {
    "recovered": "recovered",
    "paired": "paired",
    "baseline_recovered": "recovered_baseline",
    "baseline_psnr": "psnr_baseline",
    "baseline_ssim": "ssim_baseline",
    "label_chance": "label_chance",
    "recognised": "recognised",
    "recognised_truth": "recognised_truth",
    "chance_top1": "chance_top1",
    "public_baseline_top1": "public_baseline_top1",
    "mean_image_baseline_top1": "mean_image_baseline_top1",
    "mean_image_baseline_knn": "mean_image_baseline_knn",
}
"""Summary key -> column suffix of the numbers that say what the leakage scores mean
(`fedsim.evaluation.metrics.meaning_parts`): recovered of paired (`RECOVERED`), the
zero-knowledge baselines, chance. A baseline of a score is named after it (`psnr_baseline`),
so no column but `<attack>_psnr` ends in `_psnr` (the report finds attacks by these ends)."""
LEAKED = "leaked"
"""Text column `<attack>_leaked`: the kinds of leak the run's summary flags, or "none"."""
UTILITY = ("final_test_accuracy", "best_test_accuracy")
PRIVACY = tuple(f"epsilon_{kind}" for kind in KINDS)
UNITS = tuple(f"{column}_unit" for column in PRIVACY)
"""Text columns: the unit of each privacy column (carried into the seed summary)."""


def run_status(run_dir: Path) -> str:
    """failed (error.txt: it raised, or the failure policy stopped its training, even with a
    summary), done (summary.json) or pending."""
    if (run_dir / ERROR_FILE).is_file():
        return "failed"
    return "done" if RunDirectory(run_dir).summary_path.is_file() else "pending"


def run_metrics(run_dir: Path) -> dict[str, Any]:
    """Utility, privacy, leakage and wall time of one finished run directory."""
    from fedsim.evaluation.metrics import leak_kinds, leaks  # torch and torchmetrics: not for --dry-run

    run = RunDirectory(run_dir)
    summary = read_record(run.summary_path, "training", "privacy", "attacks")
    training = summary["training"] or {}
    row: dict[str, Any] = {key: training.get(key) for key in UTILITY}
    for kind, (epsilon, unit) in by_kind(summary["privacy"]).items():
        row[f"epsilon_{kind}"] = epsilon
        row[f"epsilon_{kind}_unit"] = unit
    for attack, scores in summary["attacks"].items():
        row.update({f"{attack}_{m}": scores[m] for m in (*LEAKAGE, *MODEL_LEAKAGE, *MEMBERSHIP) if m in scores})
        row.update({f"{attack}_{column}": scores[key] for key, column in MEANING.items() if key in scores})
        row[f"{attack}_{LEAKED}"] = "; ".join(leak_kinds(scores.get("leaked", leaks(scores)))) or "none"
    attack_seconds = sum(read_record(p).get("seconds", 0.0) for p in run.attacks_dir.glob("*/*.json"))
    row["wall_time_s"] = training.get("wall_time_s", 0.0) + attack_seconds
    return row


def axis_column(values: list[Any]) -> list[Any]:
    """Numbers stay numbers and text stays text; anything else (lists, mappings, a mix of
    kinds) becomes JSON text, so the column has one type and fits Parquet."""
    if all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
        return values
    if all(isinstance(v, (str, bool)) for v in values) and len({type(v) for v in values}) == 1:
        return values
    return [json.dumps(v, sort_keys=True) for v in values]


def load_results(path: Path | str) -> pd.DataFrame:
    """The results table of a sweep directory (one row per cell) or of one run directory.

    Unfinished cells have a row too (status pending or failed) with empty metrics.
    """
    import pandas as pd

    path = Path(path)
    if (path / MANIFEST).is_file():
        manifest = read_record(path / MANIFEST, "axes", "cells")
        axes, cells = manifest["axes"], manifest["cells"]
    elif RunDirectory(path).scenario_path.is_file():
        axes, cells = [], [{"name": ".", "index": 0, "seed": None, "values": {}}]
    else:
        raise UserError(f"'{path}' is neither a sweep directory ({MANIFEST}) nor a run directory")
    rows = []
    for cell in cells:
        run_dir = (path / cell["name"]).resolve()
        status = run_status(run_dir)
        rows.append(
            {
                "cell": run_dir.name,
                "index": cell["index"],
                "seed": cell["seed"] if cell["seed"] is not None else seed_of(run_dir),
                **cell["values"],
                "status": status,
                **(run_metrics(run_dir) if status == "done" else {}),
                "run_dir": str(run_dir),
            }
        )
    table = pd.DataFrame(rows)
    for axis in axes:
        table[axis] = axis_column(table[axis].tolist())
    text = {"cell", "status", "run_dir", *axes, *UNITS, *leaked_columns(table)}
    metric_columns = [c for c in table.columns if c not in text]
    table[metric_columns] = table[metric_columns].apply(pd.to_numeric, errors="coerce")
    front = ["cell", "index", "seed", *axes, "status"]
    return table[front + [c for c in table.columns if c not in front]]


def seed_of(run_dir: Path) -> int:
    import yaml

    return int(yaml.safe_load(RunDirectory(run_dir).scenario_path.read_text())["seed"])


def write_results(sweep_dir: Path) -> pd.DataFrame:
    """Write results.csv and results.parquet into the sweep directory (atomically)."""
    table = load_results(sweep_dir)
    atomic_write_bytes(sweep_dir / "results.csv", table.to_csv(index=False).encode())
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    atomic_write_bytes(sweep_dir / "results.parquet", buffer.getvalue())
    return table


def metric_columns(table: pd.DataFrame) -> list[str]:
    """Utility, privacy, leakage and meaning columns present (with a value) in `table`."""
    known = [*UTILITY, *PRIVACY]
    leakage = sorted(
        c for c in table.columns
        if any(c.endswith(f"_{m}") for m in (*LEAKAGE, *MODEL_LEAKAGE, *MEMBERSHIP, *MEANING.values()))
    )
    return [c for c in [*known, *leakage, "wall_time_s"] if c in table and table[c].notna().any()]


def leaked_columns(table: pd.DataFrame) -> list[str]:
    """The `<attack>_leaked` text columns of `table`."""
    return [c for c in table.columns if c.endswith(f"_{LEAKED}")]


def seeds_flagged(verdicts: pd.Series) -> str:
    """A setting's `<attack>_leaked` over its seeds: how many seeds flagged each kind of leak
    ("images 2/3; labels 3/3"), or "none" when no seed flagged any."""
    per_seed = [set(v.split("; ")) - {"none"} for v in verdicts.dropna()]
    kinds = sorted(set().union(*per_seed))
    return "; ".join(f"{k} {sum(k in s for s in per_seed)}/{len(per_seed)}" for k in kinds) or "none"


def mean_std(mean: float, std: float, digits: int = 4) -> str:
    """'0.4471 ± 0.0039' ('-' for no value; the spread left out when it is 0)."""
    import pandas as pd

    if pd.isna(mean):
        return "-"
    return f"{mean:.{digits}g} ± {std:.2g}" if std else f"{mean:.{digits}g}"


def seed_summary(table: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """Mean and spread over seeds of every finished combination of axis values.

    One row per `index`; for each metric M a column M (mean) and M_std (sample standard
    deviation over seeds, 0 with a single seed); `seeds` counts the finished seeds; each
    `epsilon_<kind>_unit` present joins its seeds' distinct unit labels; each `<attack>_leaked`
    counts the seeds that flagged each kind of leak (`seeds_flagged`).
    """
    import pandas as pd

    done = table[table["status"] == "done"]
    metrics = metric_columns(done)
    grouped = done.groupby("index", sort=True)
    summary = grouped[axes].first() if axes else pd.DataFrame(index=grouped.size().index)
    summary["seeds"] = grouped.size()
    means = grouped[metrics].mean()
    spreads = grouped[metrics].std(ddof=1).fillna(0.0).add_suffix("_std")
    units = grouped[[c for c in UNITS if c in done]].agg(
        lambda labels: "; ".join(sorted(set(labels.dropna())))
    )
    leaked = grouped[leaked_columns(done)].agg(seeds_flagged)
    return pd.concat([summary, means, spreads, units, leaked], axis=1).reset_index()
