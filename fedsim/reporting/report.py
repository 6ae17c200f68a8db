"""`fedsim report DIR`: one HTML file (self-contained) and one Markdown file per sweep or run.

A sweep report has the mean ± std over seeds of every setting, accuracy against epsilon
(one panel per kind of guarantee: example-level, client-level, local; see `fedsim.core.privacy`),
utility and leakage against each swept field (the defense strength), the utility-leakage
Pareto frontier per attack, one ROC figure per membership attack (a curve per cell), the table
of all cells, and reconstruction image grids per cell. A single run's report has its accuracy
and epsilon per round, its leakage per attacked observation, its ROC curves and image grids.

The report is built once as a list of blocks (headings, text, tables, figures, images) and
rendered twice: HTML with every image inline as a base64 PNG (one file to mail or archive),
and Markdown with the figures written to `report_files/` and image grids linked in place.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from fedsim.evaluation.metrics import meaning_parts, more_path
from fedsim.reporting import audit_figures, report_figures as figures
from fedsim.core.errors import UserError
from fedsim.core.results import RunDirectory, atomic_write_bytes, read_record
from fedsim.experiments.sweep_spec import short_names
from fedsim.experiments.sweep_table import (
    MANIFEST,
    leaked_columns,
    load_results,
    mean_std,
    metric_columns,
    seed_summary,
)

FIGURES_DIR = "report_files"
GRID_MAX_WIDTH_PX = 900
GRID_MAX_HEIGHT_PX = 560
"""An image grid in a table cell is shown at its own size, scaled down to fit these."""


@dataclass
class Heading:
    text: str


@dataclass
class Text:
    text: str


@dataclass
class Picture:
    """A PNG and where the Markdown report finds it (a path relative to the report); `more`:
    the file holding the pairs an image grid had no room for (relative too), if any."""

    path: str
    data: bytes
    caption: str
    more: str | None = None


Cell = str | list[Picture]


@dataclass
class TableBlock:
    headers: list[str]
    rows: list[list[Cell]]


Block = Heading | Text | TableBlock | Picture


def number(value: object) -> str:
    if isinstance(value, float):
        return "-" if pd.isna(value) else f"{value:.4g}"
    return str(value)


def frame_table(frame: pd.DataFrame) -> TableBlock:
    frame = frame.dropna(axis="columns", how="all")
    return TableBlock(
        list(frame.columns), [[number(v) for v in row] for row in frame.itertuples(index=False)]
    )


def figure(name: str, plot: Figure, caption: str) -> Picture:
    return Picture(f"{FIGURES_DIR}/{name}.png", figures.png(plot), caption)


def reconstruction_images(folder: Path) -> list[Path]:
    """An attack's image grids in `folder` (not membership attacks' ROC plots, which the
    report overlays per attack: `roc_blocks`)."""
    return sorted(p for p in folder.glob("*.png") if not p.name.endswith(".roc.png"))


def image_grid(root: Path, cells: pd.DataFrame, labels: list[str], per_cell: int) -> TableBlock | None:
    """One row per finished cell, one column per attack: its truth-vs-reconstruction PNGs
    (the first `per_cell` attacked observations), with their scores and a link to the pairs
    beyond the grid's cap (`fedsim.evaluation.metrics.more_path`); None if no attack drew any."""
    runs = [RunDirectory(path) for path in cells["run_dir"]]
    attacks = sorted(
        {
            d.name
            for run in runs
            if run.attacks_dir.exists()
            for d in run.attacks_dir.iterdir()
            if d.is_dir() and reconstruction_images(d)
        }
    )
    if not attacks:
        return None
    rows: list[list[Cell]] = []
    for label, seed, run in zip(labels, cells["seed"], runs):
        row: list[Cell] = [label, number(seed)]
        for attack in attacks:
            pictures = []
            for image in reconstruction_images(run.attacks_dir / attack)[:per_cell]:
                caption = score_caption(image.stem, read_record(image.with_suffix(".json")))
                more = more_path(image)
                pictures.append(
                    Picture(relative_to(image, root), image.read_bytes(), caption,
                            relative_to(more, root) if more.is_file() else None)
                )  # fmt: skip
            row.append(pictures)
        rows.append(row)
    return TableBlock(["setting", "seed", *attacks], rows)


def relative_to(path: Path, root: Path) -> str:
    return path.resolve().relative_to(root.resolve()).as_posix()


def score_caption(name: str, scores: dict) -> str:
    """A reconstruction's scores: PSNR/SSIM (gradient attacks) or the evaluation classifier's
    verdict (model inversion)."""
    if "psnr" in scores:
        return f"{name}: PSNR {scores['psnr']:.1f} dB, SSIM {scores['ssim']:.3f}"
    return f"{name}: top-1 {scores['top1_accuracy']:.2f}, KNN distance {scores['knn_distance']:.2f}"


def with_short_axes(table: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """`table` with each axis value as its short label ('dp_sgd noise_multiplier=0.5', not
    a JSON list of parameter mappings), so the numbers stay on screen."""
    table = table.copy()
    for axis in axes:
        table[axis] = figures.axis_labels(table[axis].tolist())
    return table


def spread_table(summary: pd.DataFrame, axes: list[str], metrics: list[str]) -> TableBlock:
    """Settings (numbered as in the plots) with 'mean ± std' over seeds of every metric."""
    spread = with_short_axes(summary, axes)[[*axes, "seeds"]]
    spread.insert(0, "#", figures.point_numbers(summary))
    for metric in metrics:
        spread[metric] = [mean_std(m, s) for m, s in zip(summary[metric], summary[f"{metric}_std"])]
    for column in leaked_columns(summary):  # seeds that flagged each kind of leak
        spread[column] = summary[column]
    return frame_table(spread)


def pareto_blocks(summary: pd.DataFrame, axes: list[str]) -> list[Block]:
    plot = figures.pareto(summary, axes)
    if plot is None:
        return []
    blocks: list[Block] = [
        Heading("Utility-leakage Pareto frontier"),
        figure(
            "pareto",
            plot,
            "Red: the settings no other setting beats on both accuracy and leakage (PSNR of "
            "gradient attacks; top-1 accuracy of model-inversion attacks). Numbers are the "
            "settings' # in the table above.",
        ),
    ]
    labels = figures.combination_labels(summary, axes)
    numbers = figures.point_numbers(summary)
    accuracy = "final_test_accuracy"
    for attack in figures.attacks_of(summary):
        leak = figures.headline(summary, attack)
        front = figures.pareto_front(summary[leak].tolist(), summary[accuracy].tolist())
        rows: list[list[Cell]] = [
            [
                number_,
                label,
                mean_std(row[accuracy], row[f"{accuracy}_std"]),
                mean_std(row[leak], row[f"{leak}_std"]),
            ]
            for number_, label, on_front, (_, row) in zip(numbers, labels, front, summary.iterrows())
            if on_front
        ]
        blocks += [
            Text(f"On the frontier for {attack}:"),
            TableBlock(["#", "setting", "final accuracy", leak], rows),
        ]
    return blocks


def sweep_blocks(root: Path, per_cell: int) -> tuple[str, list[Block]]:
    manifest = read_record(root / MANIFEST, "axes", "sweep")
    axes: list[str] = manifest["axes"]
    table = load_results(root)
    done = table[table["status"] == "done"]
    if done.empty:
        raise UserError(f"'{root}': no finished cells yet; run `fedsim sweep` first")
    summary = seed_summary(table, axes)
    seeds = ", ".join(map(str, sorted(set(summary["seeds"]))))
    blocks: list[Block] = [
        Text(manifest.get("description") or ""),
        Text(
            f"{len(done)} of {len(table)} cells finished; finished seeds per setting: {seeds}. "
            "Error bars and ± are one sample standard deviation over seeds."
        ),
        Heading("Mean and spread over seeds"),
        spread_table(summary, axes, metric_columns(done)),
        *skipped_note(done["run_dir"]),
    ]
    accuracy = figures.accuracy_vs_epsilon(summary, axes)
    if accuracy is not None:
        blocks += [
            Heading("Accuracy against epsilon, per kind of guarantee"),
            figure("accuracy_vs_epsilon", *accuracy),
        ]
    audit = audit_figures.empirical_vs_reported(summary)
    if audit is not None:
        blocks += [Heading("Audited against reported epsilon"), figure("audit_epsilon", *audit)]
    labels = figures.combination_labels(done, axes)
    if done["seed"].nunique() > 1:
        labels = [f"{label}, seed {seed}" for label, seed in zip(labels, done["seed"])]
    blocks += roc_blocks(done["run_dir"].tolist(), labels)
    blocks.append(Heading("Utility and leakage against defense strength"))
    short = short_names(axes)
    for axis in axes:
        plot = figures.leakage_vs_strength(summary, axes, axis)
        blocks.append(
            figure(f"strength_{short[axis]}", plot, f"Against {axis}; mean ± std over seeds.")
        )
    blocks += pareto_blocks(summary, axes)
    blocks += grid_blocks(
        "Reconstructions per cell (top: truth, bottom: reconstruction)",
        image_grid(root, done, figures.combination_labels(done, axes), per_cell),
    )
    blocks += [
        Heading("All cells"),
        frame_table(with_short_axes(table, axes).drop(columns=["run_dir"])),
    ]
    return f"fedsim sweep report: {manifest['sweep']}", blocks


def roc_blocks(run_dirs: list[str], labels: list[str]) -> list[Block]:
    """One ROC figure per membership attack, one curve per run (`audit_figures.roc_figures`)."""
    plots = audit_figures.roc_figures(run_dirs, labels)
    if not plots:
        return []
    return [
        Heading("Membership inference: ROC curves"),
        *(figure(f"roc_{attack}", plot, caption) for attack, plot, caption in plots),
    ]


def grid_blocks(title: str, grid: TableBlock | None) -> list[Block]:
    return [] if grid is None else [Heading(title), grid]


def skipped_note(run_dirs: pd.Series) -> list[Block]:
    """Why some scores are '-': attacked observations whose client trained on no examples
    (every Poisson-sampled DP-SGD batch empty, likely at batch size 1) have nothing to score."""
    skipped = sum(
        "skipped" in read_record(path)
        for run_dir in run_dirs
        for path in RunDirectory(run_dir).attacks_dir.glob("*/*.json")
    )
    if not skipped:
        return []
    return [
        Text(
            f"{skipped} attacked observation(s) had nothing to score: the client trained on "
            "no examples (every Poisson-sampled DP-SGD batch came out empty, likely at batch "
            "size 1), so its update is noise only. Means leave them out; '-' marks a "
            "setting where no observation was left to score."
        )
    ]


def run_blocks(root: Path, per_cell: int) -> tuple[str, list[Block]]:
    run = RunDirectory(root).require()
    if not run.summary_path.is_file():
        raise UserError(f"'{root}': the run has not finished (no summary.json); rerun it first")
    scenario = read_record(run.summary_path, "scenario")["scenario"]
    row = load_results(root)
    blocks: list[Block] = [Heading("Summary"), frame_table(row.drop(columns=["run_dir", "index"]))]
    rounds = pd.DataFrame(list(run.metrics()))
    if not rounds.empty:
        plot = figures.rounds_figure(rounds)
        blocks += [
            Heading("Training"),
            figure("rounds", plot, "Global test accuracy and privacy spent per round."),
        ]
    paths = sorted(run.attacks_dir.glob("*/*.json")) if run.attacks_dir.exists() else []
    records = [
        {**read_record(p), "attack": p.parent.name, "target": p.stem} for p in paths
    ]  # the target's name, not the attack's parameter mapping, leads each row
    attacks = read_record(run.summary_path, "attacks")["attacks"]
    if attacks:
        blocks += [
            Heading("What leaked (against a zero-knowledge attacker)"),
            TableBlock(
                ["attack", "meaning"],
                [[name, part] for name, scores in attacks.items() for part in meaning_parts(scores)],
            ),
        ]
    if records:
        columns = ["attack", "target", "psnr", "ssim", "recovered", "paired", "baseline_ssim",
                   "label_accuracy", "label_chance", "recognised", "seconds", "skipped"]  # fmt: skip
        blocks += [
            Heading("Leakage per attacked observation"),
            frame_table(pd.DataFrame(records).reindex(columns=columns)),
            *skipped_note(row["run_dir"]),
        ]
    blocks += roc_blocks([str(root)], [scenario])
    blocks += grid_blocks(
        "Reconstructions (top: truth, bottom: reconstruction)", image_grid(root, row, [scenario], per_cell)
    )
    return f"fedsim run report: {scenario}", blocks


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1500px;padding:0 1em;color:#222}
.scroll{overflow:auto;max-height:80vh;margin:1em 0}table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;vertical-align:top;white-space:nowrap}
th{background:#f3f3f3;position:sticky;top:0}figure{margin:1em 0}figcaption,small{font-size:12px;color:#555}
img{max-width:100%}td img{max-width:GRID_Wpx;max-height:GRID_Hpx;display:block}small{display:block}
""".replace("GRID_W", str(GRID_MAX_WIDTH_PX)).replace("GRID_H", str(GRID_MAX_HEIGHT_PX))


def html_image(picture: Picture) -> str:
    data = base64.b64encode(picture.data).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(picture.caption)}">'


def html_cell(cell: Cell) -> str:
    if isinstance(cell, str):
        return html.escape(cell)
    return "".join(
        f"{html_image(p)}<small>{html.escape(p.caption)}"
        + (f' (<a href="{html.escape(p.more)}">more pairs</a>)' if p.more else "")
        + "</small>"
        for p in cell
    )


def render_html(title: str, blocks: list[Block]) -> str:
    """One self-contained page: every image inline as a base64 PNG."""
    parts = [
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>",
        f"<body><h1>{html.escape(title)}</h1>",
    ]
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h2>{html.escape(block.text)}</h2>")
        elif isinstance(block, Text) and block.text:
            parts.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, TableBlock):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
            body = "".join(
                "<tr>" + "".join(f"<td>{html_cell(c)}</td>" for c in row) + "</tr>"
                for row in block.rows
            )
            parts.append(
                f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
            )
        elif isinstance(block, Picture):
            caption = html.escape(block.caption)
            parts.append(f"<figure>{html_image(block)}<figcaption>{caption}</figcaption></figure>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


MARKDOWN_SYNTAX = re.compile(r"([\\`*\[\]|])")
"""What could turn user text into code, links, emphasis or table cells (`_` and `#` inside
text are left: they rarely format, and names such as dp_sgd stay legible)."""


def markdown_text(text: str) -> str:
    """User text (names, descriptions) shown as written, as report.html shows it: HTML,
    code, links and table syntax in it do nothing."""
    return MARKDOWN_SYNTAX.sub(r"\\\1", html.escape(text, quote=False)).replace("\n", " ")


def markdown_cell(cell: Cell) -> str:
    if isinstance(cell, str):
        return markdown_text(cell)
    return "<br>".join(
        f"![{markdown_text(p.caption)}]({p.path})<br>{markdown_text(p.caption)}"
        + (f" ([more pairs]({p.more}))" if p.more else "")
        for p in cell
    )


def render_markdown(title: str, blocks: list[Block]) -> str:
    """The same report in Markdown; figures are files in report_files/."""
    lines = [f"# {markdown_text(title)}", ""]
    for block in blocks:
        if isinstance(block, Heading):
            lines += [f"## {markdown_text(block.text)}", ""]
        elif isinstance(block, Text) and block.text:
            lines += [markdown_text(block.text), ""]
        elif isinstance(block, TableBlock):
            lines.append("| " + " | ".join(map(markdown_cell, block.headers)) + " |")
            lines.append("|" + "---|" * len(block.headers))
            lines += ["| " + " | ".join(map(markdown_cell, row)) + " |" for row in block.rows]
            lines.append("")
        elif isinstance(block, Picture):
            caption = markdown_text(block.caption)
            lines += [f"![{caption}]({block.path})", "", f"*{caption}*", ""]
    return "\n".join(lines)


def write_report(directory: Path | str, images_per_cell: int = 1) -> tuple[Path, Path]:
    """Write report.html and report.md (its figures in report_files/) into `directory`."""
    root = Path(directory)
    if (root / MANIFEST).is_file():
        title, blocks = sweep_blocks(root, images_per_cell)
    elif RunDirectory(root).scenario_path.is_file():
        title, blocks = run_blocks(root, images_per_cell)
    else:
        raise UserError(f"'{root}' is neither a sweep directory ({MANIFEST}) nor a run directory")
    for block in blocks:
        if isinstance(block, Picture):  # the figures; image grids are files already
            atomic_write_bytes(root / block.path, block.data)
    html_path, markdown_path = root / "report.html", root / "report.md"
    atomic_write_bytes(html_path, render_html(title, blocks).encode())
    atomic_write_bytes(markdown_path, render_markdown(title, blocks).encode())
    return html_path, markdown_path
