"""Check that the measured numbers in README.md and docs/*.md still hold.

Each check names a doc, a regex whose one group captures a number in it, the command the doc
names next to that number (it must appear within `NEAR` characters of it), a function that
measures the number again through fedsim's API (or the named command), and a tolerance.
Timing figures are machine-dependent and not checked.

    python benchmarks/check_docs.py          # every check (about 2 minutes on 2 CPUs)
    python benchmarks/check_docs.py --fast   # the cheap ones (under a minute on 2 CPUs)

Prints one row per check (doc, number in the doc, measured, ok/DRIFT) and exits with code 1
if any number drifted, is missing from its doc or is not next to its command.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NEAR = 600  # characters between a number and the command that produces it


@dataclass(frozen=True)
class Check:
    """One measured number in one doc."""

    doc: str  # path relative to the repository root
    pattern: str  # regex matching exactly once in the doc; group 1 is the number
    command: str  # the command as the doc names it, next to the number
    measure: Callable[[], float]
    tolerance: float  # absolute
    fast: bool = False


@dataclass(frozen=True)
class Outcome:
    """A check's result: the doc's number, the measured one, and the verdict."""

    check: Check
    documented: float | None
    measured: float | None
    status: str  # ok, DRIFT, MISSING (pattern not found once), UNNAMED (no command nearby)


def locate(check: Check, root: Path) -> tuple[float | None, str]:
    """The doc's number and "ok", or None and why it cannot be checked."""
    text = (root / check.doc).read_text(encoding="utf-8")
    matches = list(re.finditer(check.pattern, text))
    if len(matches) != 1:
        return None, "MISSING"
    match = matches[0]
    around = text[max(0, match.start() - NEAR):match.end() + NEAR]
    return float(match.group(1)), "ok" if check.command in around else "UNNAMED"


def evaluate(check: Check, root: Path = ROOT) -> Outcome:
    """Locate the check's number in its doc and, if it can be checked, measure it."""
    documented, status = locate(check, root)
    if status != "ok":
        return Outcome(check, documented, None, status)
    measured = check.measure()
    drifted = abs(measured - documented) > check.tolerance
    return Outcome(check, documented, measured, "DRIFT" if drifted else "ok")


def table(outcomes: Sequence[Outcome]) -> str:
    """A markdown table of the outcomes."""
    rows = ["| doc | command | in doc | measured | tolerance | status |", "|---|---|---|---|---|---|"]
    for o in outcomes:
        measured = "" if o.measured is None else f"{o.measured:.4g}"
        documented = "" if o.documented is None else f"{o.documented:g}"
        rows.append(f"| {o.check.doc} | `{o.check.command}` | {documented} | {measured} | "
                    f"{o.check.tolerance:g} | {o.status} |")
    return "\n".join(rows)


# Measurements: each run or command once per process, in a temporary directory.


@cache
def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="check_docs-"))


@cache
def summary(path: str, *overrides: str) -> dict[str, Any]:
    """summary.json of `fedsim run path --set override ...`, run afresh."""
    import fedsim

    scenario = fedsim.scenario(ROOT / path, *overrides, f"output.dir={workdir()}")
    return fedsim.run(scenario).summary


@cache
def output(*command: str) -> str:
    """Stdout of `command`, run from the repository root."""
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout


def accuracy(path: str, *overrides: str) -> Callable[[], float]:
    return lambda: summary(path, *overrides)["training"]["final_test_accuracy"]


def leakage(path: str, attack: str, metric: str, *overrides: str, scale: float = 1.0) -> Callable[[], float]:
    return lambda: scale * summary(path, *overrides)["attacks"][attack][metric]


def epsilon(path: str, key: str, *overrides: str) -> Callable[[], float]:
    def measure() -> float:
        return next(e["epsilon"] for e in summary(path, *overrides)["privacy"] if e["key"] == key)

    return measure


def accountant(name: str, q: str) -> Callable[[], float]:
    """fedsim's epsilon for accountant `name` on the row of sampling rate `q` of accountants.py."""
    def measure() -> float:
        text = output(sys.executable, "benchmarks/accountants.py")
        row = rf"\| DP-SGD {name} \| {re.escape(q)} \|(?: [^|]+ \|){{3}} ([0-9.]+) \|"
        return float(re.search(row, text).group(1))

    return measure


def sweep_cells(path: str) -> Callable[[], float]:
    def measure() -> float:
        import fedsim

        return len(fedsim.sweep(ROOT / path, dry_run=True))

    return measure


DLG = "scenarios/dlg_lenet_digits.yaml"
POINTS = "scenarios/defense_points.yaml"
TOPK = "defenses=[{name: topk, keep_fraction: 0.1}]"
CENTRAL = "defenses=[{name: central_dp_fixed, noise_multiplier: 1.0}]"
SECAGG = "scenarios/secagg_dlg.yaml"
GIFD = "scenarios/gifd_vs_ig.yaml"
MID = "scenarios/mid_vs_dp.yaml"
MID_DP = "defenses=[{name: dp_sgd, noise_multiplier: 1.0}]"
QUANTUM = "scenarios/quantum_privacy.yaml"
HYBRID = "scenarios/quantum_hybrid_dp.yaml"
README = "README.md"

CHECKS: list[Check] = [
    Check(README, r"dp_tradeoff\.yaml --dry-run\s+# list the (\d+) cells",
          "fedsim sweep scenarios/sweeps/dp_tradeoff.yaml --dry-run",
          sweep_cells("scenarios/sweeps/dp_tradeoff.yaml"), 0, fast=True),
    Check(README, r"mean PSNR ([0-9.]+) / [0-9.]+ dB", f"fedsim run {DLG}",
          leakage(DLG, "dlg", "psnr"), 2.0, fast=True),
    Check(README, r"mean PSNR [0-9.]+ / ([0-9.]+) dB", f"fedsim run {DLG}",
          leakage(DLG, "idlg", "psnr"), 2.0, fast=True),
    Check(README, r"SSIM ([0-9.]+), labels 100%", f"fedsim run {DLG}",
          leakage(DLG, "dlg", "ssim"), 0.01, fast=True),
    Check(README, r"SSIM [0-9.]+, labels ([0-9.]+)%", f"fedsim run {DLG}",
          leakage(DLG, "idlg", "label_accuracy", scale=100), 0, fast=True),
    Check(README, r"`bash scripts/quickstart.sh` now ends\s+at ([0-9.]+)", "bash scripts/quickstart.sh",
          accuracy("scenarios/quickstart.yaml", "attacks=[]"), 0.005, fast=True),  # attacks run after training
    Check(README, r"DP-SGD \(sigma 1, C 1\) drops DLG to ([0-9.]+) dB", f"fedsim run {POINTS}",
          leakage(POINTS, "dlg", "psnr"), 0.3),
    Check(README, r"\(client epsilon ([0-9.]+) after 3 rounds", f"fedsim run {POINTS}",
          epsilon(POINTS, "max_client_epsilon"), 0.01),
    Check(README, r"top-k 10% to ([0-9.]+) dB", TOPK, leakage(POINTS, "dlg", "psnr", TOPK), 0.3),
    Check(README, r"central DP \(sigma 1\) left it at ([0-9.]+) dB", CENTRAL,
          leakage(POINTS, "dlg", "psnr", CENTRAL), 2.0),
    Check(README, r"still recovers all four digits \(([0-9.]+) dB", f"fedsim run {SECAGG}",
          leakage(SECAGG, "dlg", "psnr"), 0.5),
    Check(README, r"a 10-image batch, still reaches ([0-9.]+) dB", "--set data.num_clients=10",
          leakage(SECAGG, "dlg", "psnr", "data.num_clients=10"), 0.3),
    Check("docs/defenses.md", r"sigma 0\.5,\s+100 steps: prv ([0-9.]+)", "python benchmarks/accountants.py",
          accountant("prv", "0.007752"), 0.001, fast=True),
    Check("docs/defenses.md", r"sigma 0\.5,\s+100 steps: prv [0-9.]+, rdp ([0-9.]+)",
          "python benchmarks/accountants.py", accountant("rdp", "0.007752"), 0.001, fast=True),
    Check("docs/baselines.md", r"scenario ends at test R\^2 ([0-9.-]+)",
          "fedsim run scenarios/ldp_sparse_regression.yaml",
          accuracy("scenarios/ldp_sparse_regression.yaml"), 0.005, fast=True),
    Check("docs/baselines.md", r"the second at ([0-9.-]+)", "fedsim run scenarios/ldp_sparse_regression_trig.yaml",
          accuracy("scenarios/ldp_sparse_regression_trig.yaml"), 0.005, fast=True),
    Check("docs/baselines.md", r"ends at\s+test accuracy ([0-9.]+) \(10 classes",
          "fedsim run scenarios/dp_kde_digits.yaml", accuracy("scenarios/dp_kde_digits.yaml"), 0.005, fast=True),
    Check("docs/gradient_inversion.md", r"`grad_inversion` ([0-9.]+) dB\n", "fedsim run scenarios/grad_inversion_resnet.yaml",
          leakage("scenarios/grad_inversion_resnet.yaml", "grad_inversion", "psnr"), 0.5),
    Check("docs/baselines.md", r"ends at distance test\s+accuracy ([0-9.]+) with",
          "fedsim run scenarios/dp_distance_digits.yaml", accuracy("scenarios/dp_distance_digits.yaml"), 0.005, fast=True),
    *(Check("docs/gifd.md", rf"`{attack}` ([0-9.]+) dB,? ", f"fedsim run {GIFD}", leakage(GIFD, attack, "psnr"), 0.5)
      for attack in ("ig", "gan_latent", "gifd")),
    Check("docs/model_inversion.md", r"ends at target test accuracy ([0-9.]+)", f"{MID} --set attacks=[]",
          accuracy(MID, "attacks=[]"), 0.005, fast=True),
    Check("docs/model_inversion.md", r"at test accuracy ([0-9.]+) with client epsilon", MID_DP,
          accuracy(MID, "attacks=[]", MID_DP), 0.01),
    Check("docs/model_inversion.md", r"with client epsilon ([0-9.]+) \(table", MID_DP,
          epsilon(MID, "max_client_epsilon", "attacks=[]", MID_DP), 0.01),
    Check("docs/privacy_auditing.md", r"final test accuracy ([0-9.]+); 1 min", "fedsim run scenarios/mia_digits.yaml",
          accuracy("scenarios/mia_digits.yaml", "attacks=[]"), 0.005, fast=True),  # attacks run after training
    Check("docs/quantum_privacy.md", r"After 30 rounds the test\s+R\^2 is \*\*([0-9.]+)\*\*", f"fedsim run {QUANTUM}",
          accuracy(QUANTUM, "attacks=[]"), 0.005, fast=True),  # attacks run after training
    Check("docs/quantum_privacy.md", r"\| no DP \| ([0-9.]+) \| - \|", f"fedsim run {HYBRID} --set defenses=[]",
          accuracy(HYBRID, "defenses=[]"), 0.01),
    Check("docs/quantum_privacy.md", r"\| DP-SGD \| \*\*([0-9.]+)\*\* \|", f"fedsim run {HYBRID}",
          accuracy(HYBRID), 0.01),
    Check("docs/quantum_privacy.md", r"\| DP-SGD \| \*\*[0-9.]+\*\* \| \*\*([0-9.]+)\*\* \|", f"fedsim run {HYBRID}",
          epsilon(HYBRID, "max_client_epsilon"), 0.01),
]


def main(argv: Sequence[str] | None = None, checks: Sequence[Check] = CHECKS, root: Path = ROOT) -> int:
    """Run the checks (only the fast ones with --fast), print the table; 1 if any failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="only the cheap checks")
    args = parser.parse_args(argv)
    try:
        outcomes = [evaluate(c, root) for c in checks if c.fast or not args.fast]
    finally:
        shutil.rmtree(workdir(), ignore_errors=True)
        workdir.cache_clear()
    print(table(outcomes))
    return int(any(o.status != "ok" for o in outcomes))


if __name__ == "__main__":
    sys.exit(main())
