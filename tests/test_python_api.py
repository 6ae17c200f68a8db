"""The Python API as documented: every python block of docs/python_api.md runs, in order, in
one namespace, and gives the numbers the page promises, without flooding the terminal."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim.core.config import build_scenario

DOC = Path(__file__).resolve().parents[1] / "docs" / "python_api.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_every_documented_snippet_runs_quietly_and_gives_its_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for number, block in enumerate(python_blocks(DOC.read_text())):
        exec(compile(block, f"{DOC.name} block {number}", "exec"), namespace)
    out, err = capfd.readouterr()
    assert len((out + err).splitlines()) <= 3, out + err  # not Flower's log, not the run's progress

    settings, scenario, run = namespace["settings"], namespace["scenario"], namespace["run"]
    assert settings["federation"]["rounds"] == 3 and settings["attacks"][0]["iterations"] == 5
    assert (scenario.federation.rounds, scenario.attacks[0].params.iterations) == (2, 2)

    assert namespace["rounds"]["round"].tolist() == [0, 1, 2]
    assert run.summary["training"]["final_test_accuracy"] == namespace["rounds"]["test_accuracy"].iloc[-1]
    scores = namespace["scores"]
    assert sorted(scores["target"]) == ["round_0001_client_0000", "round_0001_client_0001"]
    assert (scores["attack"] == "dlg").all() and scores["psnr"].notna().all()
    recons = namespace["recons"]
    assert sorted(recons) == sorted(scores["target"])
    assert tuple(namespace["first"].images.shape) == (1, 1, 8, 8) and namespace["first"].labels.shape == (1,)
    assert namespace["same"].scores.equals(scores)

    result = namespace["result"]
    assert tuple(result.reconstructions[0].images.shape) == (1, 1, 8, 8)
    assert len(result.scores) == 1 and 0 <= result.scores["label_accuracy"].iloc[0] <= 1

    cells, table = namespace["cells"], namespace["table"]
    assert len(cells) == 2 and (cells["status"] == "pending").all()
    assert table["training.lr"].tolist() == [0.05, 0.5]
    assert (table["status"] == "done").all() and table["final_test_accuracy"].notna().all()


def test_build_scenario_leaves_its_input_unchanged() -> None:
    raw = {"model": "mlp", "attacks": [{"name": "dlg"}], "federation": {"rounds": 2}}
    before = repr(raw)
    scenario = build_scenario(raw, ["model.hidden=[8]", "attacks.0.iterations=5", "federation.rounds=1"])
    assert repr(raw) == before
    assert scenario.federation.rounds == 1 and scenario.attacks[0].params.iterations == 5


def test_import_fedsim_loads_neither_torch_nor_flower() -> None:
    code = "import sys, fedsim; print(fedsim.__version__, 'torch' in sys.modules, 'flwr' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    version, torch_loaded, flower_loaded = out.split()
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", version) and (torch_loaded, flower_loaded) == ("False", "False")
