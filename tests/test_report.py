"""`fedsim report`: a self-contained HTML page and a Markdown file, checked in headless Chromium.

One small DP-SGD sweep (2 noise levels x 2 seeds) is run once for the module with
`fedsim sweep`; the report of it, and of a single run, is then checked: every image inline
and a real PNG, the numbers in the tables equal to the results table, the Pareto frontier
right, and Chromium loads every plot and image (non-zero natural size, a non-blank page).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import yaml
from cli_helpers import run_cli

from fedsim.reporting.report_figures import pareto_front
from fedsim.experiments.sweep_table import load_results, mean_std, seed_summary

SCENARIO = {
    "name": "report",
    "data": {"dataset": "digits", "num_clients": 4},
    "model": {"name": "mlp", "hidden": [16]},
    "training": {"batch_size": 1, "local_steps": 1, "lr": 0.5},
    "federation": {"rounds": 3},
    "observer": {"rounds": [1], "clients": [0]},
    "defenses": [{"name": "dp_sgd", "noise_multiplier": 1.0}],
    "attacks": [{"name": "dlg", "iterations": 10}],
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
    # figures: accuracy vs epsilon, one strength plot (one axis), Pareto; one grid per cell
    assert len(page.images) == 3 + len(NOISE) * len(SEEDS)
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
    assert len(page.images) == 2  # accuracy and epsilon per round; one reconstruction grid
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"{summary['training']['final_test_accuracy']:.4g}" in page.cells
    assert "round_0001_client_0000" in page.cells

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
    assert "| setting | final accuracy | mi_face_top1_accuracy |" in markdown
    assert "class_00: top-1 " in markdown  # the reconstructions' captions
    page = Page()
    page.feed((tmp_path / "mi" / "report.html").read_text())
    assert len(page.images) == 2 + 2 * 1  # strength plot, Pareto; one image per cell
    table = load_results(tmp_path / "mi")
    for value in table["mi_face_top1_accuracy"]:
        assert f"{value:.4g}" in page.cells


def chromium(*args: str | Path, user_data: Path) -> subprocess.CompletedProcess[str]:
    command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={user_data}", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium not installed (scripts/test.sh installs it with apt-get where it can)",
)
def test_chromium_renders_every_plot_and_image(sweep_dir: Path, tmp_path: Path) -> None:
    run_cli("report", sweep_dir)
    html = (sweep_dir / "report.html").read_text()
    # a copy with a probe that lists every image's natural size once the page has loaded
    probe = (
        "<script>window.addEventListener('load', () => { const p = document.createElement('pre');"
        " p.id = 'probe'; p.textContent = JSON.stringify([...document.images].map("
        "i => [i.naturalWidth, i.naturalHeight])); document.body.appendChild(p); });</script>"
    )
    page = tmp_path / "probe.html"
    page.write_text(html.replace("</body>", probe + "</body>"))
    dom = chromium(
        "--virtual-time-budget=10000", "--dump-dom", page.as_uri(), user_data=tmp_path / "profile1"
    )
    found = re.search(r'<pre id="probe">([^<]*)</pre>', dom.stdout)
    assert found, dom.stderr[-2000:]
    sizes = json.loads(found.group(1))
    assert len(sizes) == 3 + len(NOISE) * len(SEEDS)
    assert all(width > 100 and height > 100 for width, height in sizes), sizes

    shot = tmp_path / "shot.png"
    chromium(
        "--hide-scrollbars",
        "--window-size=1200,1600",
        f"--screenshot={shot}",
        (sweep_dir / "report.html").as_uri(),
        user_data=tmp_path / "profile2",
    )
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (1600, 1200)
    colours = np.unique((pixels.reshape(-1, 3) * 255).astype(np.uint8), axis=0)
    assert len(colours) > 100 and pixels.std() > 0.05  # plots and text, not a blank page
