"""Gradient inversion under realistic local training: IG by round, batch size and local epochs.

    fedsim sweep scenarios/sweeps/realistic_inversion.yaml
    python benchmarks/realistic_inversion.py runs/sweeps/realistic_inversion

Reads every cell's per-target records (`attacks/ig/round_RRRR_client_CCCC.json`) and prints,
per cell and attacked round, the test accuracy of the model the clients received, the mean PSNR
and SSIM over the attacked clients, the reconstructions recovered (SSIM >= 0.7) of those
paired with a true image, and the label accuracy (docs/gradient_inversion.md holds one run).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fedsim.core.results import RunDirectory
from fedsim.pipeline.runner import load_run_scenario


def cell_rows(cell: Path) -> list[str]:
    """One table row per attacked round of one sweep cell."""
    run = RunDirectory(cell)
    training = load_run_scenario(run).training
    metrics = {record["round"]: record for record in run.metrics()}
    rows = []
    for round_dir in sorted({p.name[:10] for p in (cell / "attacks" / "ig").glob("round_*_client_*.json")}):
        records = [json.loads(p.read_text()) for p in sorted((cell / "attacks" / "ig").glob(f"{round_dir}_client_*.json"))]
        server_round = records[0]["round"]
        steps = sorted({c["local-steps"] for c in metrics[server_round]["clients"]})
        accuracy = {r: m.get("test_accuracy") for r, m in metrics.items()}
        rows.append(
            f"| {training.batch_size} | {training.local_epochs} | {', '.join(map(str, steps))} | {server_round} "
            f"| {accuracy[server_round - 1]:.3f} | {statistics.mean(r['psnr'] for r in records):.1f} "
            f"| {statistics.mean(r['ssim'] for r in records):.2f} "
            f"| {sum(r['recovered'] for r in records)}/{sum(r['paired'] for r in records)} "
            f"| {statistics.mean(r['label_accuracy'] for r in records):.2f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the sweep's output directory")
    args = parser.parse_args()
    print("| batch | local epochs | local steps | round | test accuracy of the sent model | PSNR dB | SSIM "
          "| recovered (SSIM >= 0.7) | label accuracy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cell in sorted(args.sweep.glob("cell-*")):
        print("\n".join(cell_rows(cell)))


if __name__ == "__main__":
    main()
