"""Logging finished runs to MLflow, for users who keep their experiments there.

Optional (`pip install 'fedsim[tracking]'`): the run directory stays the record, MLflow gets a
copy of it. One MLflow run per fedsim run directory, logged once it is finished:

- params: every field of the resolved scenario, by dotted path (`defenses.0.noise_multiplier`);
- metrics: test accuracy and loss per round (step = round), final and best accuracy, one
  epsilon per kind of guarantee (`epsilon_example`, `epsilon_client`, `epsilon_local`, as in
  the results table), wall time, and per attack `<attack>.<score>` (PSNR, SSIM, label
  accuracy, model-inversion scores, what they mean: recovered counts, baselines), as in the
  sweep's results table;
- tags: `fedsim.run_dir`, `fedsim.scenario`, `fedsim.epsilon_<kind>_unit` (each epsilon's
  level, relation, delta, accountant and defense), `fedsim.<attack>_leaked` (the kinds of leak
  flagged), and for sweep cells `fedsim.experiments.sweep`,
  `fedsim.cell`, `fedsim.seed`;
- artifacts: scenario.yaml, summary.json and the reconstruction images.

Logging is idempotent: each MLflow run carries the key of the fedsim run it copies (its
directory and when it finished), and a run already in the experiment is not logged again, so
a resumed sweep adds only its new cells. `sqlite:///mlflow.db` is MLflow's local store (its
file store is in maintenance mode and refuses to start); `mlflow ui --backend-store-uri
sqlite:///mlflow.db` shows it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import yaml

from fedsim.core.errors import UserError
from fedsim.core.results import RunDirectory, read_json
from fedsim.experiments.sweep_table import LEAKAGE, MEANING, MODEL_LEAKAGE, run_metrics

RUN_KEY_TAG = "fedsim.run_key"
MAX_PARAM_CHARS = 6000  # MLflow's limit on one parameter value


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings and lists -> {dotted.path: leaf}, as scenario overrides name fields."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and value:
        items = enumerate(value)
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a local SQLite store go beside its database file (`mlartifacts/`), not
    into whatever directory the command ran in; other stores choose their own."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    return (Path(tracking_uri.removeprefix(prefix)).resolve().parent / "mlartifacts").as_uri()


def run_key(run_dir: Path) -> str:
    """Which finished fedsim run an MLflow run copies: its directory and finishing time."""
    finished = read_json(RunDirectory(run_dir).summary_path)["training"].get("finished_at", "")
    return hashlib.sha256(f"{run_dir.resolve()}|{finished}".encode()).hexdigest()[:16]


class MlflowTracker:
    """Copies finished run directories into one MLflow experiment."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        try:
            from mlflow import MlflowClient
        except ImportError as err:
            raise UserError(
                "--mlflow needs MLflow: pip install 'fedsim[tracking]' (or leave --mlflow out)"
            ) from err
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # it logs every schema migration
        try:
            self.client = MlflowClient(tracking_uri=tracking_uri)
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(
                experiment, artifact_location=artifact_location(tracking_uri)
            )
        except Exception as err:
            raise UserError(
                f"--mlflow {tracking_uri}: MLflow cannot open this store "
                f"({type(err).__name__}: {str(err).splitlines()[0]}); "
                "give a store such as sqlite:///mlflow.db"
            ) from err

    def logged(self, key: str) -> bool:
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1
        )
        return bool(runs)

    def log_run(self, run_dir: Path, tags: dict[str, str] | None = None) -> str | None:
        """Log one finished run directory; returns the MLflow run id, None if already logged."""
        run = RunDirectory(run_dir)
        key = run_key(run_dir)
        if self.logged(key):
            return None
        scenario = yaml.safe_load(run.scenario_path.read_text())
        all_tags = {
            RUN_KEY_TAG: key,
            "fedsim.run_dir": str(run_dir.resolve()),
            "fedsim.scenario": str(scenario.get("name", "")),
            **{f"fedsim.{k}": v for k, v in run_metrics(run_dir).items() if isinstance(v, str)},  # units, leaks
            **(tags or {}),
        }
        mlflow_run = self.client.create_run(
            self.experiment_id, run_name=run_dir.name, tags=all_tags
        )
        run_id = mlflow_run.info.run_id
        self.log_contents(run_id, run, scenario)
        self.client.set_terminated(run_id)
        return run_id

    def log_contents(self, run_id: str, run: RunDirectory, scenario: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param

        params = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in flatten(scenario).items()]
        now = int(time.time() * 1000)  # MLflow timestamps are milliseconds
        metrics = [Metric(k, v, now, 0) for k, v in summary_metrics(run.root).items()]
        for record in run.metrics():
            metrics += [
                Metric(name, float(record[name]), now, int(record["round"]))
                for name in ("test_accuracy", "test_loss")
                if record.get(name) is not None
            ]
        # MLflow takes at most 100 params and 1000 metrics per batch
        for start in range(0, max(len(params), len(metrics)), 100):
            self.client.log_batch(
                run_id, metrics=metrics[start : start + 100], params=params[start : start + 100]
            )
        for path in (run.scenario_path, run.summary_path):
            self.client.log_artifact(run_id, str(path))
        for image in sorted(run.attacks_dir.glob("*/*.png")):
            self.client.log_artifact(run_id, str(image), artifact_path=f"attacks/{image.parent.name}")


def summary_metrics(run_dir: Path) -> dict[str, float]:
    """The results-table numbers of a run, with `<attack>_<score>` spelled `<attack>.<score>`
    (MLflow's UI groups metrics by their dotted prefix). The unit texts go into tags."""
    renamed = {}
    for name, value in run_metrics(run_dir).items():
        if value is None or isinstance(value, str):  # units and leak verdicts go into tags
            continue
        for score in (*LEAKAGE, *MODEL_LEAKAGE, *MEANING.values()):
            if name.endswith(f"_{score}"):
                name = f"{name.removesuffix(f'_{score}')}.{score}"
                break
        renamed[name] = float(value)
    return renamed
