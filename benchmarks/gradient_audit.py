"""White-box DP audit with Dirac gradient canaries: empirical against reported epsilon.

Runs scenarios/dp_audit_gradient.yaml (8 clients, one full-batch DP-SGD step per round, 2,000
gradient canaries, every update observed) at each noise multiplier, with the correct
mechanism and with a buggy one (Opacus's noise divided by 10, the accountant unchanged), and
prints the one-run lower bound and the Gaussian-trade-off bound (the canaries are independent
trials of one Gaussian mechanism, `fedsim.evaluation.auditing.gdp_audit`) next to the reported
epsilon. For reference it also prints what the one-run estimator reaches on ideal scores of
the same Gaussian mechanism (mu = sqrt(rounds) / sigma per canary; the median over 12 draws of
2,000 canaries): what a perfect attack gets.

`--runs N` (N > 1) is the multi-run audit: the correct mechanism at each sigma, N runs with
seeds 0..N-1 (each its own canary coin flips and noise), every canary of every run one trial;
it prints the pooled Clopper-Pearson bound (`multi_run_audit`) and the pooled Gaussian bound.

    python benchmarks/gradient_audit.py                  # 4 rounds; sigma 1, 2, 4, 8, clipping only
    python benchmarks/gradient_audit.py --rounds 1 --noise 1 2
    python benchmarks/gradient_audit.py --runs 10 --noise 1 2 4
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import opacus.optimizers.optimizer as hooks_optimizer
import opacus.optimizers.optimizer_fast_gradient_clipping as ghost_optimizer

import fedsim
from fedsim.evaluation.auditing import gdp_audit, multi_run_audit, one_run_audit

SCENARIO = "scenarios/dp_audit_gradient.yaml"


def audit(noise: float, rounds: int, clip: float, buggy: bool, out: Path, seed: int = 0) -> dict[str, Any]:
    """The audit record of one run (`buggy`: the noise Opacus draws is divided by 10), with its
    trials (`scores`, `included`)."""
    generate = hooks_optimizer._generate_noise
    if buggy:  # both modes' optimizers (an MLP trains in ghost mode)
        hooks_optimizer._generate_noise = ghost_optimizer._generate_noise = (
            lambda std, *a, **k: generate(std / 10, *a, **k)
        )
    try:
        started = time.perf_counter()
        scenario = fedsim.scenario(
            SCENARIO, f"defenses.0.noise_multiplier={noise}", f"defenses.0.max_grad_norm={clip}",
            f"federation.rounds={rounds}", f"seed={seed}",
        )
        run = fedsim.run(scenario, run_dir=out)
        results = run.path / "attacks" / "canary_gradient_audit"
        record = json.loads((results / "audit.json").read_text())
        trials = json.loads((results / "trials.json").read_text())
        return {**record, **trials, "seconds": time.perf_counter() - started}
    finally:
        hooks_optimizer._generate_noise = ghost_optimizer._generate_noise = generate


def ideal_bound(mu: float, canaries: int = 2000, draws: int = 12) -> float:
    """The one-run bound on exact Gaussian scores (in ~ N(mu, 1), out ~ N(0, 1)): median of draws."""
    bounds = []
    for seed in range(draws):
        rng = np.random.default_rng(seed)
        included = rng.random(canaries) < 0.5
        bounds.append(one_run_audit(rng.normal(size=canaries) + mu * included, included, 1e-5).epsilon_lower_bound)
    return float(np.median(bounds))


def pooled_table(noises: list[float], rounds: int, clip: float, runs: int) -> None:
    """The multi-run audit: every canary of `runs` seeded runs one trial, per sigma."""
    print("| sigma | reported epsilon | runs x canaries | multi-run bound | ratio | Gaussian bound | ratio | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for noise in noises:
            records = [audit(noise, rounds, clip, False, Path(tmp) / f"{noise}-{seed}", seed) for seed in range(runs)]
            scores = np.concatenate([r["scores"] for r in records])
            included = np.concatenate([r["included"] for r in records])
            reported, delta = records[0]["reported"]["epsilon"], records[0]["reported"]["delta"]
            pooled = multi_run_audit(scores, included, delta).epsilon_lower_bound
            gaussian = gdp_audit(scores, included, delta).epsilon_lower_bound
            print(f"| {noise:g} | {reported:.2f} | {runs} x {len(records[0]['scores'])} | {pooled:.2f} | "
                  f"{pooled / reported:.2f} | {gaussian:.2f} | {gaussian / reported:.2f} | "
                  f"{sum(r['seconds'] for r in records):.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0, 0.0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clip", type=float, default=10.0, help="max_grad_norm C (the canaries' norm)")
    parser.add_argument("--runs", type=int, default=1, help="> 1: the multi-run audit over this many seeds")
    args = parser.parse_args()
    if args.runs > 1:
        pooled_table([n for n in args.noise if n], args.rounds, args.clip, args.runs)
        return
    print("| sigma | mechanism | reported epsilon | lower bound | ratio | Gaussian bound | ratio | ideal one-run bound | canary AUC | correct / guesses | violation | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for noise in args.noise:
            for buggy in (False, True) if noise else (False,):
                r = audit(noise, args.rounds, args.clip, buggy, Path(tmp) / f"{noise}-{buggy}")
                reported = r["reported"]["epsilon"] or math.inf  # null: clipping only
                bound = r["epsilon_lower_bound"]
                ideal = f"{ideal_bound(math.sqrt(args.rounds) / noise):.2f}" if noise and not buggy else "-"
                gaussian = r["gaussian_epsilon_bound"]
                ratio, gaussian_ratio = (
                    (f"{bound / reported:.2f}", f"{gaussian / reported:.2f}") if math.isfinite(reported) else ("-", "-")
                )
                print(
                    f"| {noise:g} | {'noise / 10' if buggy else 'correct'} | {reported:.2f} | {bound:.2f} | "
                    f"{ratio} | {gaussian:.2f} | {gaussian_ratio} | {ideal} | {r['auc']:.3f} | "
                    f"{r['audit']['correct']} / {r['audit']['guesses']} | "
                    f"{r['violation'] or r['gaussian_violation']} | {r['seconds']:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
