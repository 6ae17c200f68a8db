"""Every epsilon carries its unit: metrics records, summary.json, the results table (one
column per kind of guarantee) and the report's plots (one axis per kind), on fake defenses
and fake run directories so no federation has to train."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
from pydantic import BaseModel

from fedsim.core import privacy
from fedsim.core.defense import Defense, PrivacyUnit, Stage
from fedsim.reporting.report_figures import accuracy_vs_epsilon, rounds_figure
from fedsim.core.results import RunDirectory, atomic_write_json
from fedsim.pipeline.runner import write_summary
from fedsim.experiments.sweep import summary_table
from fedsim.experiments.sweep_table import MANIFEST, load_results, seed_summary

EXAMPLE = PrivacyUnit("example", "add/remove", 1e-5, "prv")
CENTRAL = PrivacyUnit("client", "add/remove", 1e-3, "gaussian")
LOCAL = PrivacyUnit("client", "replace-one", 1e-5, "basic", metric="local_dp_epsilon")


def fake_defense(stage: Stage, unit: PrivacyUnit | None) -> Defense:
    """A defense that only states a unit (the hooks these tests need)."""

    class Fake(Defense):
        class Params(BaseModel):
            pass

        def privacy_unit(self) -> PrivacyUnit | None:
            return unit

    Fake.stage = stage
    return Fake(Fake.Params())


class PrivateStrategy:
    """A registered strategy class whose unit depends on its params (as dp_gd's delta)."""

    @classmethod
    def privacy_unit(cls, params: Any) -> PrivacyUnit:
        return PrivacyUnit("example", "add/remove", params["delta"], "rdp")


def test_every_epsilon_of_a_record_gets_its_unit_and_kind() -> None:
    defenses = [fake_defense("train", EXAMPLE), fake_defense("server", CENTRAL),
                fake_defense("update", LOCAL), fake_defense("update", None)]  # fmt: skip
    claimed = privacy.claims(["dp_sgd", "central_dp_fixed", "local_dp", "pruning"], defenses, ("fedavg", None))
    record = {"max_client_epsilon": 0.9, "central_epsilon": 2.0, "max_client_local_dp_epsilon": 8.0,
              "max_client_plugin_epsilon": 1.0, "test_accuracy": 0.5}  # fmt: skip
    entries = {e["key"]: e for e in privacy.entries(record, claimed)}
    assert {k: e["kind"] for k, e in entries.items()} == {
        "max_client_epsilon": "example",
        "central_epsilon": "client",
        "max_client_local_dp_epsilon": "local",
        "max_client_plugin_epsilon": "unstated",  # a defense that states no unit: not guessed
    }
    dp = entries["max_client_epsilon"]
    assert (dp["epsilon"], dp["defense"], dp["level"], dp["relation"], dp["delta"], dp["accountant"]) == (
        0.9, "dp_sgd", "example", "add/remove", 1e-5, "prv"
    )  # fmt: skip
    assert dp["unit"] == "example-level, add/remove, delta=1e-05 (prv), dp_sgd"
    assert entries["max_client_plugin_epsilon"]["level"] is None


def test_a_private_strategy_states_its_unit_from_its_instance_or_its_class() -> None:
    built = SimpleNamespace(privacy_unit=lambda: EXAMPLE)
    assert privacy.strategy_unit(PrivateStrategy, {"delta": 1e-6}, built) == EXAMPLE
    unit = privacy.strategy_unit(PrivateStrategy, {"delta": 1e-6}, object())
    assert unit is not None and unit.delta == 1e-6
    assert privacy.strategy_unit(object, {}, object()) is None
    (claim,) = privacy.claims([], [], ("dp_gd", unit))
    assert (claim.key, claim.kind, claim.source) == ("max_client_epsilon", "example", "dp_gd")


def entry(key: str, epsilon: float, kind: str, unit: str) -> dict[str, Any]:
    return {"key": key, "epsilon": epsilon, "kind": kind, "unit": unit}


def test_the_run_summary_lists_each_epsilon_with_its_unit(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    defenses = [fake_defense("train", EXAMPLE), fake_defense("server", CENTRAL)]
    claimed = privacy.claims(["dp_sgd", "central_dp_fixed"], defenses, ("fedavg", None))
    for server_round, epsilon in ((1, 0.5), (2, 0.9)):
        record = {"round": server_round, "test_accuracy": 0.5, "max_client_epsilon": epsilon,
                  "central_epsilon": 2 * epsilon}  # fmt: skip
        run.append_metrics({**record, "privacy": privacy.entries(record, claimed)})
    summary = write_summary(run, SimpleNamespace(name="fake", defenses=[]))
    assert [(e["key"], e["epsilon"], e["level"], e["delta"]) for e in summary["privacy"]] == [
        ("max_client_epsilon", 0.9, "example", 1e-5),
        ("central_epsilon", 1.8, "client", 1e-3),
    ]
    assert json.loads(run.summary_path.read_text())["privacy"] == summary["privacy"]


@pytest.fixture()
def sweep_dir(tmp_path: Path) -> Path:
    """A finished two-cell sweep, two seeds each: DP-SGD (example-level) and central DP."""
    cells = []
    settings = {
        "dp_sgd": [entry("max_client_epsilon", 1.0, "example", "example-level, add/remove, delta=1e-05 (prv), dp_sgd")],
        "central_dp_fixed": [entry("central_epsilon", 3.0, "client", "client-level, add/remove, delta=0.001 (gaussian), central_dp_fixed")],
    }  # fmt: skip
    for index, (name, privacy_entries) in enumerate(settings.items()):
        for seed in (0, 1):
            cell = f"{name}-s{seed}"
            cells.append({"name": cell, "index": index, "seed": seed, "values": {"defense": name}})
            entries = [{**e, "epsilon": e["epsilon"] + seed} for e in privacy_entries]
            atomic_write_json(
                tmp_path / cell / "summary.json",
                {"training": {"final_test_accuracy": 0.6 + 0.1 * index, "wall_time_s": 1.0},
                 "privacy": entries, "attacks": {}},
            )  # fmt: skip
    atomic_write_json(tmp_path / MANIFEST, {"axes": ["defense"], "cells": cells})
    return tmp_path


def test_example_and_client_level_epsilons_never_share_a_column(sweep_dir: Path) -> None:
    table = load_results(sweep_dir).set_index("cell")
    assert "epsilon" not in table
    assert table.loc["dp_sgd-s1", "epsilon_example"] == 2.0
    assert pd.isna(table.loc["dp_sgd-s1", "epsilon_client"])
    assert table.loc["central_dp_fixed-s0", "epsilon_client"] == 3.0
    assert pd.isna(table.loc["central_dp_fixed-s0", "epsilon_example"])
    assert table.loc["central_dp_fixed-s0", "epsilon_client_unit"].startswith("client-level")

    summary = seed_summary(load_results(sweep_dir), ["defense"]).set_index("defense")
    assert summary.loc["dp_sgd", "epsilon_example"] == 1.5  # mean over the two seeds
    assert summary.loc["dp_sgd", "epsilon_example_std"] == pytest.approx(0.7071, rel=1e-3)
    assert summary.loc["central_dp_fixed", "epsilon_client"] == 3.5
    assert "delta=0.001" in summary.loc["central_dp_fixed", "epsilon_client_unit"]


def test_the_report_plots_each_kind_on_its_own_axes(sweep_dir: Path) -> None:
    summary = seed_summary(load_results(sweep_dir), ["defense"])
    result = accuracy_vs_epsilon(summary, ["defense"])
    assert result is not None
    figure, _ = result
    labels = [axis.get_xlabel().replace("\n", " ") for axis in figure.axes]
    assert len(labels) == 2
    assert "example-level, add/remove, delta=1e-05" in labels[0] and "client-level" not in labels[0]
    assert "client-level, add/remove, delta=0.001" in labels[1] and "example-level" not in labels[1]


def test_a_single_run_plots_each_kind_on_its_own_axes() -> None:
    entries = [entry("max_client_epsilon", 0.9, "example", "example-level, ..., dp_sgd"),
               entry("central_epsilon", 2.0, "client", "client-level, ..., central_dp_fixed")]  # fmt: skip
    metrics = pd.DataFrame(
        [{"round": r, "test_accuracy": 0.5, "max_client_epsilon": r, "central_epsilon": 2 * r,
          "privacy": entries} for r in (1, 2)]  # fmt: skip
    )
    figure = rounds_figure(metrics)
    assert len(figure.axes) == 3
    assert "example-level" in figure.axes[1].get_ylabel()
    assert "client-level" in figure.axes[2].get_ylabel()


def test_the_sweep_screen_has_one_epsilon_column_per_kind_and_names_the_units(sweep_dir: Path) -> None:
    sweep = SimpleNamespace(axes=["defense"], spec=SimpleNamespace(name="fake"))
    screen = summary_table(sweep, load_results(sweep_dir))
    titles = [column.header for column in screen.columns]
    assert "eps example" in titles and "eps client" in titles
    assert "delta=1e-05" in str(screen.caption) and "delta=0.001" in str(screen.caption)


def test_a_real_run_records_its_epsilon_with_the_unit_its_defense_states(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wiring end to end (server -> metrics.jsonl -> summary.json -> results table), with
    DP-SGD's unit fixed here so the test does not depend on what dp_sgd states."""
    from rich.console import Console

    from fedsim.defenses.dp_sgd import DpSgd
    from fedsim.core.config import build_scenario
    from fedsim.pipeline.runner import run_scenario

    monkeypatch.setattr(DpSgd, "privacy_unit", lambda self: EXAMPLE)
    scenario = build_scenario(
        {
            "name": "units",
            "data": {"dataset": "digits", "num_clients": 2},
            "model": {"name": "mlp", "hidden": [8]},
            "training": {"batch_size": 4, "local_steps": 1},
            "federation": {"rounds": 2},
            "defenses": [{"name": "dp_sgd", "noise_multiplier": 1.0}],
        }
    )
    run = run_scenario(scenario, tmp_path / "run", Console(quiet=True))
    last = list(run.metrics())[-1]
    (entry,) = last["privacy"]
    assert (entry["key"], entry["kind"], entry["defense"], entry["delta"]) == (
        "max_client_epsilon", "example", "dp_sgd", 1e-5
    )  # fmt: skip
    assert entry["epsilon"] == last["max_client_epsilon"] > 0
    assert json.loads(run.summary_path.read_text())["privacy"] == last["privacy"]
    row = load_results(run.root).iloc[0]
    assert row["epsilon_example"] == entry["epsilon"]
    assert row["epsilon_example_unit"] == entry["unit"]


def test_a_summary_written_before_units_were_recorded_is_read_as_unstated() -> None:
    assert privacy.by_kind({"max_client_epsilon": 0.9}) == {
        "unstated": (0.9, "unit not stated (max_client_epsilon)")
    }
