"""The defense matrix: run `scenarios/defense_matrix.yaml` with `fedsim sweep` (resumable) and
print one table: defense, parameter, test accuracy, epsilon (where defined), PSNR and label
accuracy per attack.

Every number is read back from the cells' run directories (summary.json). The epsilon column
is the privacy spent after the last round, and the unit column says what it protects, as the
defense states it (`fedsim.core.privacy`): level, relation, delta, accountant.

    python benchmarks/defense_matrix.py                          # run (or resume) and print
    python benchmarks/defense_matrix.py --docs docs/defenses.md  # ... and update the docs table
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

from rich.console import Console

from fedsim.core.privacy import by_kind
from fedsim.core.results import read_json
from fedsim.experiments.sweep import run_sweep
from fedsim.experiments.sweep_spec import load_sweep

SWEEP_FILE = Path(__file__).resolve().parents[1] / "scenarios" / "defense_matrix.yaml"
DOCS_BEGIN, DOCS_END = "<!-- defense-matrix:begin -->", "<!-- defense-matrix:end -->"


def defense_cells(defenses: list[dict[str, Any]]) -> tuple[str, str]:
    """('dp_sgd', 'noise_multiplier=1.0, max_grad_norm=1.0') for a cell's defense list."""
    if not defenses:
        return "none", ""
    names = " + ".join(d["name"] for d in defenses)
    params = "; ".join(
        ", ".join(f"{k}={v}" for k, v in d.items() if k != "name") for d in defenses
    )
    return names, params


def number(value: float | None, digits: int) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def matrix_rows(table: Any, attacks: list[str]) -> list[list[str]]:
    rows = []
    for _, cell in table.iterrows():
        name, params = defense_cells(json.loads(cell["defenses"]))
        if cell["status"] != "done":
            rows.append([name, params, cell["status"], "", "", *[""] * (2 * len(attacks))])
            continue
        summary = read_json(Path(cell["run_dir"]) / "summary.json")
        kinds = by_kind(summary["privacy"]).values()  # one epsilon per kind, with its unit
        row = [
            name,
            params,
            number(summary["training"]["final_test_accuracy"], 3),
            " / ".join(number(epsilon, 2) for epsilon, _ in kinds),
            " / ".join(unit for _, unit in kinds),
        ]
        for attack in attacks:
            scores = summary["attacks"].get(attack, {})
            row += [number(scores.get("psnr"), 1), number(scores.get("label_accuracy"), 2)]
        rows.append(row)
    return rows


def markdown(rows: list[list[str]], attacks: list[str]) -> str:
    header = ["defense", "parameter", "test accuracy", "epsilon", "epsilon unit"]
    for attack in attacks:
        header += [f"{attack} PSNR dB", f"{attack} label acc"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def update_docs(path: Path, table: str, command: str) -> None:
    """Replace the text between the defense-matrix markers in `path`."""
    text = path.read_text()
    if DOCS_BEGIN not in text or DOCS_END not in text:
        raise SystemExit(f"{path} lacks the markers {DOCS_BEGIN} ... {DOCS_END}")
    block = f"{DOCS_BEGIN}\n`{command}`\n\n{table}\n{DOCS_END}"
    pattern = re.escape(DOCS_BEGIN) + ".*?" + re.escape(DOCS_END)
    path.write_text(re.sub(pattern, lambda _: block, text, flags=re.DOTALL))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=SWEEP_FILE, help="the sweep file")
    parser.add_argument("--workers", type=int, default=None, help="cells at once (default: the file's)")
    parser.add_argument("--docs", type=Path, default=None, help="markdown file to update")
    args = parser.parse_args()
    console = Console()
    sweep = load_sweep(args.sweep, args.workers)
    outcome = run_sweep(sweep, console)
    attacks = [a.name for a in sweep.cells[0].scenario.attacks]
    table = markdown(matrix_rows(outcome.table, attacks), attacks)
    print(table)
    if args.docs is not None:
        update_docs(args.docs, table, "python benchmarks/defense_matrix.py --docs docs/defenses.md")


if __name__ == "__main__":
    main()
