"""White-box DP audit with Dirac gradient canaries (`data.canaries.kind: gradient`): DP-SGD adds
each included canary as a per-example gradient of norm C on its own coordinate before the
noise; `canary_gradient_audit` reads it back from the recorded updates. The audit is sound on
the real mechanism, reaches what the one-run estimator can reach on a Gaussian mechanism, and
catches DP-SGD whose noise was divided by 10 while its accountant was not."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsim.core.config import Scenario, load_scenario
from fedsim.core.defense import LocalTraining
from fedsim.core.errors import UserError
from fedsim.data.canaries import parameter_count
from fedsim.data.datasets import federated_data
from fedsim.defenses.dp_sgd import DpSgd

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "scenarios" / "dp_audit_gradient.yaml"


def audit_scenario(*overrides: str) -> Scenario:
    """scenarios/dp_audit_gradient.yaml (8 clients of ~180 digits, one full-batch DP-SGD step per
    round, 2,000 gradient canaries on an MLP of 2,410 parameters, C = 10, every update observed)
    in one round, which keeps a run to a few seconds."""
    return load_scenario(SCENARIO, ["federation.rounds=1", *overrides])


def test_gradient_canaries_take_no_example_and_get_distinct_coordinates():
    scenario = audit_scenario()
    data = federated_data(scenario.data, scenario.public().seed)
    canaries = data.canaries
    assert canaries.kind == "gradient" and len(canaries.index) == 0
    assert len(data.test) + len(data.train) == len(data.pool)  # the test set keeps every example
    assert 950 < canaries.included.sum() < 1050
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    coordinates = canaries.coordinates(parameter_count(model))
    assert len(set(coordinates.tolist())) == 2000 and coordinates.max() < 2410
    assert np.array_equal(coordinates, canaries.coordinates(2410))  # every party agrees
    mine = canaries.gradient_canaries(3, model)
    assert mine == tuple(coordinates[(canaries.client == 3) & canaries.included].tolist())
    assert len(data.client(3)[0]) == len(data.client_indices(3)[0])  # no example added
    with pytest.raises(UserError, match="data.canaries.count=2000.*has 330"):
        canaries.coordinates(330)


def test_gradient_canaries_need_dp_sgd_and_their_own_audit():
    with pytest.raises(UserError, match="data.canaries.kind: gradient canaries .* add the dp_sgd"):
        audit_scenario("defenses=[]")
    with pytest.raises(UserError, match="'canary_audit' scores input canaries"):
        audit_scenario("attacks=[canary_audit]")
    with pytest.raises(UserError, match="'canary_gradient_audit' scores gradient canaries"):
        audit_scenario("data.canaries.kind=input", "data.canaries.count=100")


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_dp_sgd_adds_each_canary_as_a_clipped_per_example_gradient(mode):
    """Noise 0, one full-batch step: the canaries change the step by exactly C / batch on their
    coordinates and nowhere else, in both Opacus modes."""
    torch.manual_seed(0)
    start = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3))
    data = TensorDataset(torch.randn(16, 64), torch.randint(0, 3, (16,)))
    C, coordinates = 0.5, (3, 517, 538)  # in the first weight, the first bias, the last weight

    def gradient(canaries: tuple[int, ...]) -> torch.Tensor:
        model = copy.deepcopy(start)
        loader = DataLoader(data, batch_size=16, generator=torch.Generator().manual_seed(1))
        training = LocalTraining(16, 16, 1, 1, 1, 1, 0, gradient_canaries=canaries)
        defense = DpSgd(DpSgd.Params(noise_multiplier=0.0, max_grad_norm=C, grad_sample_mode=mode))
        private, optimizer, loader = defense.prepare(model, torch.optim.SGD(model.parameters(), lr=1.0), loader, training, {})
        x, y = next(iter(loader))
        optimizer.zero_grad()
        defense.criterion(nn.CrossEntropyLoss())(private(x), y).backward()
        optimizer.step()
        defense.finish({})
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    difference = gradient(coordinates) - gradient(())
    expected = torch.zeros_like(difference)
    expected[list(coordinates)] = C / 16  # Opacus divides the clipped sum by the expected batch
    torch.testing.assert_close(difference, expected, rtol=1e-4, atol=1e-6)


def audit(tmp_path: Path, noise: float) -> tuple[dict, dict]:
    from fedsim.pipeline.runner import run_scenario

    scenario = audit_scenario(f"defenses.0.noise_multiplier={noise}")
    run = run_scenario(scenario, tmp_path, Console(quiet=True))
    record = json.loads((run.attacks_dir / "canary_gradient_audit" / "audit.json").read_text())
    return record, json.loads(run.summary_path.read_text())


def test_white_box_audit_is_sound_and_as_tight_as_one_run_allows(tmp_path):
    """sigma = 1, one round: the Gaussian mechanism with mu = 1, epsilon 4.39 at delta 1e-5. The
    attack is optimal (its AUC is the Gaussian's Phi(mu / sqrt 2) = 0.760); the one-run bound
    on Gaussian scores reaches only about a third of epsilon (ideal scores: 0.34 x, median over
    draws, benchmarks/gradient_audit.py), and it stays below epsilon."""
    record, summary = audit(tmp_path, 1.0)
    reported = record["reported"]["epsilon"]
    assert record["reported"]["kind"] == "example" and reported == pytest.approx(4.39, abs=0.02)
    assert record["auc"] == pytest.approx(stats.norm.cdf(1 / math.sqrt(2)), abs=0.03)
    assert 0.3 * reported <= record["epsilon_lower_bound"] <= reported
    assert record["violation"] is False and summary["attacks"]["canary_gradient_audit"]["audit_violation"] is False
    # the canaries are independent trials of the Gaussian mechanism: the Gaussian trade-off
    # bound uses its shape and gets past half of epsilon, still below it
    gaussian = record["gaussian_epsilon_bound"]
    assert 0.5 * reported <= gaussian <= reported and record["gaussian_audit"]["mu_lower_bound"] <= 1.0
    assert record["gaussian_violation"] is False
    assert summary["attacks"]["canary_gradient_audit"]["gaussian_epsilon_bound"] == pytest.approx(gaussian)


def test_white_box_audit_catches_noise_divided_by_ten(tmp_path, monkeypatch):
    """A buggy mechanism: Opacus's noise divided by 10, the accountant still told sigma = 2
    (reported epsilon 2.00): the canaries are told apart (AUC 0.998) and the bound (4.37) rises
    to more than twice the reported epsilon; the run is flagged."""
    import opacus.optimizers.optimizer as hooks_optimizer
    import opacus.optimizers.optimizer_fast_gradient_clipping as ghost_optimizer

    generate = hooks_optimizer._generate_noise
    for module in (hooks_optimizer, ghost_optimizer):  # the MLP trains in ghost mode (auto)
        monkeypatch.setattr(module, "_generate_noise", lambda std, *a, **k: generate(std / 10, *a, **k))
    record, summary = audit(tmp_path, 2.0)
    assert record["reported"]["epsilon"] == pytest.approx(2.0, abs=0.02)
    assert record["auc"] > 0.99
    assert record["epsilon_lower_bound"] > 2 * record["reported"]["epsilon"]
    assert record["violation"] is True and summary["attacks"]["canary_gradient_audit"]["audit_violation"] is True
    assert record["gaussian_epsilon_bound"] > 2 * record["reported"]["epsilon"] and record["gaussian_violation"] is True


CLIENT_SCENARIO = ROOT / "scenarios" / "dp_audit_client.yaml"


def client_audit(tmp_path: Path) -> tuple[dict, dict]:
    from fedsim.pipeline.runner import run_scenario

    run = run_scenario(load_scenario(CLIENT_SCENARIO, []), tmp_path, Console(quiet=True))
    record = json.loads((run.attacks_dir / "canary_client_audit" / "audit.json").read_text())
    return record, json.loads(run.summary_path.read_text())


def test_client_canaries_audit_central_dp_at_the_client_level(tmp_path):
    """scenarios/dp_audit_client.yaml: 2,000 Dirac canary clients beside 8 real ones under
    central_dp_fixed (z = 1, C = 1, 2 rounds): each canary's coordinate sees the Gaussian
    mechanism twice, sqrt(2)-GDP, so the attack's AUC is Phi(1) = 0.841 and both bounds stay
    below the reported client-level epsilon; the Gaussian one passes half of it."""
    record, summary = client_audit(tmp_path)
    reported = record["reported"]
    assert reported["kind"] == "client" and reported["relation"] == "zero-out"
    assert record["auc"] == pytest.approx(stats.norm.cdf(1.0), abs=0.03)
    assert record["epsilon_lower_bound"] <= reported["epsilon"]
    assert 0.5 * reported["epsilon"] <= record["gaussian_epsilon_bound"] <= reported["epsilon"]
    assert record["violation"] is False and record["gaussian_violation"] is False
    assert summary["attacks"]["canary_client_audit"]["gaussian_epsilon_bound"] == pytest.approx(record["gaussian_epsilon_bound"])


def test_client_audit_catches_central_noise_divided_by_ten(tmp_path, monkeypatch):
    import flwr.serverapp.strategy.dp_fixed_clipping as flower_fixed

    stdv = flower_fixed.compute_stdv
    monkeypatch.setattr(flower_fixed, "compute_stdv", lambda *args: stdv(*args) / 10)
    record, _ = client_audit(tmp_path)
    assert record["auc"] > 0.99
    assert record["gaussian_epsilon_bound"] > 2 * record["reported"]["epsilon"]
    assert record["gaussian_violation"] is True


@pytest.mark.parametrize(
    "defense",
    [
        "{name: central_dp_fixed_client, noise_multiplier: 1.0, clipping_norm: 1.0}",
        "{name: central_dp_adaptive, noise_multiplier: 1.0, initial_clipping_norm: 1.0, clipped_count_stddev: 5}",
        "{name: central_dp_adaptive_client, noise_multiplier: 1.0, initial_clipping_norm: 1.0, clipped_count_stddev: 5}",
    ],
)
def test_client_canaries_audit_every_central_dp_variant(tmp_path, defense):
    """Client-side clipping (Flower's mods) and adaptive clipping, where C moves every round
    (1 -> 0.90 -> 0.82 here: the canaries are never clipped) and each canary adds the round's
    C: canary i's score is C_1 + C_2 against noise sqrt(C_1^2 + C_2^2) z, mu = 1.41 as with a
    fixed C, so the AUC is Phi(1) again and both bounds stay below the reported epsilon (the
    adaptive ones account the noised count too: z_eff = 0.985)."""
    from fedsim.pipeline.runner import run_scenario

    run = run_scenario(load_scenario(CLIENT_SCENARIO, [f"defenses=[{defense}]"]), tmp_path, Console(quiet=True))
    record = json.loads((run.attacks_dir / "canary_client_audit" / "audit.json").read_text())
    assert record["reported"]["kind"] == "client"
    assert record["auc"] == pytest.approx(stats.norm.cdf(1.0), abs=0.03)
    assert record["epsilon_lower_bound"] <= record["gaussian_epsilon_bound"] <= record["reported"]["epsilon"]
    assert record["gaussian_epsilon_bound"] >= 0.5 * record["reported"]["epsilon"]


def test_client_canaries_need_central_dp():
    with pytest.raises(UserError, match="client canaries .* add a central_dp_\\* defense"):
        load_scenario(CLIENT_SCENARIO, ["defenses=[]"])


def test_multi_run_audit_pools_the_seeds_of_one_scenario(tmp_path):
    """Three one-round runs of the gradient-canary scenario (sigma 1: mu = 1, epsilon 4.39),
    seeds 0-2: `fedsim audit` pools their 6,000 trials; both bounds stay below epsilon and the
    pooled Gaussian bound is above the one-run bounds' best."""
    from cli_helpers import run_cli

    from fedsim.pipeline.pooled_audit import pooled_audit
    from fedsim.pipeline.runner import run_scenario

    runs = []
    for seed in range(3):
        scenario = audit_scenario("defenses.0.noise_multiplier=1.0", f"seed={seed}")
        runs.append(run_scenario(scenario, tmp_path / f"seed{seed}", Console(quiet=True)).root)
    result = pooled_audit(runs, "canary_gradient_audit")
    reported = result["reported"]["epsilon"]
    assert result["trials"] == 6000 and reported == pytest.approx(4.39, abs=0.02)
    assert result["multi_run"]["epsilon_lower_bound"] <= result["gaussian"]["epsilon_lower_bound"] <= reported
    singles = [json.loads((r / "attacks" / "canary_gradient_audit" / "audit.json").read_text()) for r in runs]
    assert result["gaussian"]["epsilon_lower_bound"] > max(s["gaussian_epsilon_bound"] for s in singles)
    assert not result["violation"] and not result["gaussian_violation"]
    code, out, _ = run_cli("audit", *runs, "--attack", "canary_gradient_audit", "--out", tmp_path / "pooled.json")
    assert code == 0 and "6000 trials" in out
    assert json.loads((tmp_path / "pooled.json").read_text())["trials"] == 6000
    other = run_scenario(audit_scenario("defenses.0.noise_multiplier=2.0"), tmp_path / "other", Console(quiet=True)).root
    with pytest.raises(UserError, match="differ in more than their seed"):
        pooled_audit([runs[0], other], "canary_gradient_audit")
    with pytest.raises(UserError, match="not independent trials"):
        pooled_audit(runs, "canary_audit")
