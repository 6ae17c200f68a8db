"""`fedsim report`: a self-contained HTML page and a Markdown file, checked in headless Chromium.

One small DP-SGD sweep (2 noise levels x 2 seeds) is run once for the module with
`fedsim sweep`; the report of it, and of a single run, is then checked: every image inline
and a real PNG, the numbers in the tables equal to the results table, the Pareto frontier
right, and Chromium loads every plot and image (non-zero natural size, a non-blank page).
"""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from cli_helpers import run_cli

from fedsim.evaluation.metrics import save_image_grid
from fedsim.reporting.audit_figures import roc_figures
from fedsim.reporting.report_figures import axis_labels, pareto, pareto_front
from fedsim.experiments.sweep_table import load_results, mean_std, seed_summary

SCENARIO = {
    "name": "report",
    "data": {"dataset": "digits", "num_clients": 4},
    "model": {"name": "mlp", "hidden": [16]},
    "training": {"batch_size": 1, "local_steps": 1, "lr": 0.5},
    "federation": {"rounds": 3},
    "observer": {"rounds": [1], "clients": [0]},
    "defenses": [{"name": "dp_sgd", "noise_multiplier": 1.0}],
    "attacks": [{"name": "dlg", "iterations": 1, "evaluations_per_step": 10}, "loss_threshold"],
}
NOISE = [0.5, 2.0]
SEEDS = [0, 1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


MATRIX_DEFENSES = [
    [],
    [{"name": "dp_sgd", "noise_multiplier": 0.5, "max_grad_norm": 1.0}],
    [{"name": "gaussian_noise", "std": 0.01}],
    [{"name": "gaussian_noise", "std": 0.1}],
]
MATRIX_LABELS = ["none", "dp_sgd max_grad_norm=1 noise_multiplier=0.5", "gaussian_noise std=0.01",
                 "gaussian_noise std=0.1"]  # fmt: skip
MATRIX_BATCH = 70  # pairs in an image grid: 64 in the grid (4 rows of 16), 6 in more/


@pytest.fixture(scope="module")
def matrix_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A defense-matrix-like sweep: one list-valued axis (a defenses list per cell, zipped),
    and a batch too large for one row of images."""
    root = tmp_path_factory.mktemp("matrix")
    scenario = {**SCENARIO, "defenses": [], "training": {"batch_size": MATRIX_BATCH, "local_steps": 1, "lr": 0.5}}
    spec = {
        "name": "matrix",
        "scenario": {**scenario, "federation": {"rounds": 2}, "attacks": [{"name": "dlg", "iterations": 1, "evaluations_per_step": 3}]},
        "mode": "zip",
        "axes": {"defenses": MATRIX_DEFENSES},
        "output": str(root),
    }
    (root / "sweep.yaml").write_text(yaml.safe_dump(spec))
    code, out, err = run_cli("sweep", root / "sweep.yaml")
    assert code == 0, (out, err)
    code, out, err = run_cli("report", root / "matrix")
    assert code == 0, (out, err)
    return root / "matrix"


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    spec = {
        "name": "dp",
        "description": "noise against leakage",
        "scenario": SCENARIO,
        "seeds": SEEDS,
        "axes": {"defenses.0.noise_multiplier": NOISE},
        "workers": 1,
        "output": str(root),
    }
    (root / "sweep.yaml").write_text(yaml.safe_dump(spec))
    code, out, err = run_cli("sweep", root / "sweep.yaml")
    assert code == 0, (out, err)
    return root / "dp"


class Page(HTMLParser):
    """The tags, image sources and table cells of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []
        self.cells: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")
        self._in_cell = tag in ("td", "th")

    def handle_endtag(self, tag: str) -> None:
        self._in_cell = self._in_cell and tag not in ("td", "th")

    def handle_data(self, data: str) -> None:
        if self._in_cell:
            self.cells.append(data)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_pareto_front_numbers() -> None:
    leakage = [10.0, 5.0, 5.0, 20.0, float("nan"), 30.0]
    utility = [0.5, 0.5, 0.6, 0.9, 1.0, 0.9]
    # (5, 0.6) beats (10, 0.5) and (5, 0.5); (20, 0.9) beats (30, 0.9); NaN is never on it
    assert pareto_front(leakage, utility) == [False, False, True, True, False, False]


def test_sweep_report_is_self_contained_and_matches_the_table(sweep_dir: Path) -> None:
    code, out, err = run_cli("report", sweep_dir)
    assert code == 0, (out, err)
    page = Page()
    page.feed((sweep_dir / "report.html").read_text())
    assert not {"script", "link", "iframe"} & set(page.tags)
    # figures: accuracy vs epsilon, one strength plot (one axis), Pareto, loss_threshold's
    # ROC curves; one grid per cell (dlg's: a ROC curve is no reconstruction)
    assert len(page.images) == 4 + len(NOISE) * len(SEEDS)
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        width, height = png_size(base64.b64decode(src.split(",", 1)[1]))
        assert width > 100 and height > 100

    table = load_results(sweep_dir)
    summary = seed_summary(table, ["defenses.0.noise_multiplier"])
    assert summary["seeds"].tolist() == [2, 2]
    for _, row in summary.iterrows():
        accuracy = mean_std(row["final_test_accuracy"], row["final_test_accuracy_std"])
        psnr = mean_std(row["dlg_psnr"], row["dlg_psnr_std"])
        assert accuracy in page.cells and psnr in page.cells
    # more noise, less epsilon; DP-SGD's is example-level, in its own column
    assert summary["epsilon_example"].iloc[0] > summary["epsilon_example"].iloc[1] > 0
    assert "example-level" in summary["epsilon_example_unit"].iloc[0]
    assert any("example-level" in c for c in page.cells)  # the all-cells table names the unit
    for cell in table["cell"]:
        assert cell in page.cells  # the all-cells table

    markdown = (sweep_dir / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(links) == len(page.images)
    assert all((sweep_dir / link).is_file() for link in links)
    assert (
        "## Utility-leakage Pareto frontier" in markdown
        and "| defenses.0.noise_multiplier |" in markdown
    )
    assert "## Membership inference: ROC curves" in markdown and "report_files/roc_loss_threshold.png" in links
    ((attack, plot, _),) = roc_figures(table["run_dir"].tolist(), table["cell"].tolist())
    curves = [line.get_label() for line in plot.axes[0].get_lines()]
    assert attack == "loss_threshold" and len(curves) == len(NOISE) * len(SEEDS) + 1  # and chance
    for cell, curve in zip(table["cell"], curves):
        auc = json.loads((sweep_dir / cell / "attacks" / attack / "final_model.json").read_text())["auc"]
        assert curve == f"{cell} (AUC {auc:.3f})"
    assert png_size((sweep_dir / "report_files" / "roc_loss_threshold.png").read_bytes())[0] >= 500


def test_image_grids_wrap_and_cap(tmp_path: Path) -> None:
    """The quickstart's 142 pairs: 4 rows of 16 in the grid, the next 78 in more/ (once a
    17,120 x 300 px strip); a later, smaller grid removes the stale more/ file."""
    images = torch.rand((142, 1, 8, 8))
    path = tmp_path / "round_0001_client_0001.png"
    save_image_grid(images, images, path, title="dlg")
    more = tmp_path / "more" / path.name
    (width, height), (more_width, more_height) = png_size(path.read_bytes()), png_size(more.read_bytes())
    assert 1500 < width < 2500 and 600 < height < 1200  # 16 x 4 pairs
    assert more_width == width and more_height > height  # 16 x 5 pairs (78)
    save_image_grid(images[:3], images[:3], path)
    assert png_size(path.read_bytes())[0] >= 300 and not more.exists()


def test_axis_labels_are_short() -> None:
    values = [json.dumps(v, sort_keys=True) for v in MATRIX_DEFENSES]
    assert axis_labels(values) == MATRIX_LABELS
    assert axis_labels([0.5, 2.0]) == ["0.5", "2"] and axis_labels(["sgd", "adam"]) == ["sgd", "adam"]
    both = json.dumps([{"name": "topk", "keep_fraction": 0.1}, {"name": "quantize", "method": "int8"}])
    assert axis_labels([both]) == ["topk keep_fraction=0.1 + quantize method=int8"]


def test_one_point_frontier_is_drawn() -> None:
    summary = pd.DataFrame(
        {"index": [0], "x": [1.0], "final_test_accuracy": [0.9], "final_test_accuracy_std": [0.0],
         "dlg_psnr": [12.0], "dlg_psnr_std": [0.0]}
    )  # fmt: skip
    plot = pareto(summary, ["x"])
    red = [c for c in plot.axes[0].collections if c.get_label() == "Pareto frontier"]
    assert len(red) == 1 and len(red[0].get_offsets()) == 1


def test_list_valued_sweep_report_has_short_labels_and_capped_grids(matrix_dir: Path) -> None:
    page = Page()
    page.feed((matrix_dir / "report.html").read_text())
    assert not [c for c in page.cells if '{"' in c or "[{" in c]  # no JSON in any table
    for label in MATRIX_LABELS:
        assert page.cells.count(label) >= 2  # the spread and all-cells tables
    assert "#" in page.cells
    grids = sorted(matrix_dir.glob("cell-*/attacks/dlg/round_0001_client_0000.png"))
    assert len(grids) == len(MATRIX_DEFENSES)
    del grids[1]  # DP-SGD's Poisson-sampled batch is not the whole batch
    for grid in grids:
        width, height = png_size(grid.read_bytes())
        assert (width, height) == png_size(grids[0].read_bytes()) and 1500 < width < 2500
        assert (grid.parent / "more" / grid.name).is_file()  # the 6 pairs beyond 64
    markdown = (matrix_dir / "report.md").read_text()
    more = re.findall(r"\[more pairs\]\(([^)]+)\)", markdown)
    assert len(more) == len(grids) and all((matrix_dir / m).is_file() for m in more)
    assert len(page.images) == 3 + len(MATRIX_DEFENSES)  # the more/ files are linked, not inlined
    strength = png_size((matrix_dir / "report_files" / "strength_defenses.png").read_bytes())
    assert strength[0] >= 500 and strength[1] >= 800  # four stacked panels, readable labels


def test_single_run_report(tmp_path: Path) -> None:
    scenario = tmp_path / "run.yaml"
    scenario.write_text(yaml.safe_dump(SCENARIO))
    run_dir = tmp_path / "run"
    code, out, err = run_cli("run", scenario, "--run-dir", run_dir)
    assert code == 0, (out, err)
    code, out, err = run_cli("report", run_dir, "--images", "1")
    assert code == 0, (out, err)
    page = Page()
    page.feed((run_dir / "report.html").read_text())
    assert len(page.images) == 3  # accuracy and epsilon per round; ROC; one reconstruction grid
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"{summary['training']['final_test_accuracy']:.4g}" in page.cells
    assert "round_0001_client_0000" in page.cells and "dlg" in page.cells  # not its parameters
    dlg = summary["attacks"]["dlg"]
    assert dlg["recovered_threshold"] == "SSIM >= 0.7" and 0 <= dlg["recovered"] <= dlg["paired"]
    assert 0.1 <= dlg["label_chance"] < 0.2 and dlg["judge"].startswith("convnet")
    assert f"{dlg['recovered']}/{dlg['paired']} recovered (SSIM >= 0.7)" in page.cells
    if CHROMIUM:
        assert_sane_layout(rendered(run_dir / "report.html", tmp_path), 3)

    code, out, err = run_cli("report", tmp_path / "nothing")
    assert code == 2 and err.startswith("error: ") and "neither a sweep directory" in err


def test_model_inversion_sweep_report_plots_attack_accuracy(tmp_path: Path) -> None:
    """A sweep whose attack is model inversion (scored by the evaluation classifier, no PSNR)
    gets its leakage plots, Pareto frontier on top-1 accuracy, and per-class images."""
    scenario = {
        "name": "mi",
        "data": {"dataset": "digits", "num_clients": 3, "public_classes": [5, 6, 7, 8, 9]},
        "model": {"name": "mlp", "hidden": [32]},
        "training": {"batch_size": 32, "local_epochs": 1, "lr": 0.5},
        "federation": {"rounds": 2},
        "observer": {"rounds": "none"},
        "attacks": [{"name": "mi_face", "iterations": 10, "images_per_class": 1}],
    }
    spec = {
        "name": "mi",
        "scenario": scenario,
        "axes": {"defenses": [[], [{"name": "mid", "beta": 0.1}]]},
        "output": str(tmp_path),
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    code, out, err = run_cli("sweep", tmp_path / "sweep.yaml")
    assert code == 0, (out, err)
    code, out, err = run_cli("report", tmp_path / "mi")
    assert code == 0, (out, err)

    markdown = (tmp_path / "mi" / "report.md").read_text()
    assert "## Utility-leakage Pareto frontier" in markdown
    assert "class_00: top-1 " in markdown  # the reconstructions' captions
    page = Page()
    page.feed((tmp_path / "mi" / "report.html").read_text())
    frontier = ["#", "setting", "final accuracy", "mi_face_top1_accuracy"]  # the frontier table
    assert any(page.cells[i : i + 4] == frontier for i in range(len(page.cells)))
    assert len(page.images) == 2 + 2 * 1  # strength plot, Pareto; one image per cell
    table = load_results(tmp_path / "mi")
    for value in table["mi_face_top1_accuracy"]:
        assert f"{value:.4g}" in page.cells


def chromium(*args: str | Path, user_data: Path) -> subprocess.CompletedProcess[str]:
    command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={user_data}", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


PROBE = """<script>window.addEventListener('load', () => {
  const images = [...document.images].map(i => { const r = i.getBoundingClientRect();
    return [i.naturalWidth, i.naturalHeight, Math.round(r.width), Math.round(r.height)]; });
  const overflowing = [...document.querySelectorAll('td, th, p, h1, h2, figcaption, small')]
    .filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.textContent.slice(0, 80));
  const found = {images, overflowing, page: document.documentElement.scrollWidth, window: innerWidth};
  const p = document.createElement('pre'); p.id = 'probe'; p.hidden = true;
  p.textContent = JSON.stringify(found); document.body.appendChild(p); });</script>"""
"""Lists, once the page has loaded: every image's natural and rendered size, the text
elements whose content is wider than their box, and the page's width against the window's."""


def rendered(report: Path, tmp_path: Path) -> dict:
    """What Chromium (1200 x 1600 px window) shows of `report` (see PROBE)."""
    page = tmp_path / f"probe-{report.parent.name}.html"
    page.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    dom = chromium(
        "--virtual-time-budget=10000", "--window-size=1200,1600", "--dump-dom", page.as_uri(),
        user_data=tmp_path / "profile-probe",
    )
    found = re.search(r'<pre id="probe" hidden="">([^<]*)</pre>', dom.stdout)
    assert found, dom.stderr[-2000:]
    return json.loads(html.unescape(found.group(1)))


def screenshot(report: Path, tmp_path: Path, height: int = 1600) -> np.ndarray:
    shot = tmp_path / f"shot-{report.parent.name}.png"
    chromium(
        "--hide-scrollbars", f"--window-size=1200,{height}", f"--screenshot={shot}", report.as_uri(),
        user_data=tmp_path / "profile-shot",
    )
    return matplotlib.image.imread(shot)[..., :3]


def assert_sane_layout(found: dict, images: int) -> None:
    """Every image loaded at a readable size (none a sliver, none a 17,000 px strip), no text
    wider than its box, and nothing wider than the window (wide tables scroll in their box)."""
    assert len(found["images"]) == images
    for natural_w, natural_h, shown_w, shown_h in found["images"]:
        assert natural_w <= 4000 and natural_h <= 4000, found["images"]
        assert shown_w >= 300 and shown_h >= 150, found["images"]
    assert not found["overflowing"], found["overflowing"]
    assert found["page"] <= found["window"], (found["page"], found["window"])


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium not installed (scripts/test.sh installs it with apt-get where it can)",
)


@needs_chromium
def test_chromium_renders_every_plot_and_image(sweep_dir: Path, tmp_path: Path) -> None:
    run_cli("report", sweep_dir)
    assert_sane_layout(rendered(sweep_dir / "report.html", tmp_path), 4 + len(NOISE) * len(SEEDS))
    pixels = screenshot(sweep_dir / "report.html", tmp_path)
    assert pixels.shape[:2] == (1600, 1200)
    colours = np.unique((pixels.reshape(-1, 3) * 255).astype(np.uint8), axis=0)
    assert len(colours) > 100 and pixels.std() > 0.05  # plots and text, not a blank page


@needs_chromium
def test_chromium_renders_the_list_valued_sweep_report(matrix_dir: Path, tmp_path: Path) -> None:
    assert_sane_layout(rendered(matrix_dir / "report.html", tmp_path), 3 + len(MATRIX_DEFENSES))
    pixels = screenshot(matrix_dir / "report.html", tmp_path, height=6000)
    drawn = np.flatnonzero((pixels < 0.9).any(axis=(1, 2)))
    assert pixels.std() > 0.05 and drawn.max() > 3000  # plots, tables and grids down the page
