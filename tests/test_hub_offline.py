"""A Hugging Face dataset on a machine where the Hub does not answer: read from the cache when
it is there, else one line naming the field and the fix, exit 2, no run directory, in seconds
(not the ~25 s of the Hub client's retries). No test here reaches the network."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest
from PIL import Image

from fedsim import cli
from fedsim.core.registry import DATASETS

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused


@pytest.fixture
def no_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An unreachable Hub, HF_HUB_OFFLINE unset, an empty datasets cache in `tmp_path`."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", UNREACHABLE)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return cache


def test_uncached_dataset_fails_fast_in_one_line_without_a_run_directory(
    no_hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = tmp_path / "hf.yaml"
    out = tmp_path / "runs"
    scenario.write_text(
        "name: hf_offline\ndata: {dataset: {name: huggingface, path: ylecun/mnist}, num_clients: 2}\n"
        f"model: {{name: mlp}}\nfederation: {{rounds: 1}}\noutput: {{dir: {out}}}\n"
    )
    monkeypatch.setattr(sys, "argv", ["fedsim", "run", str(scenario)])
    capsys.readouterr()
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    elapsed = time.perf_counter() - started
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: data.dataset.path: 'ylecun/mnist' is not in the Hugging Face cache")
    assert f"the Hub at {UNREACHABLE} gives no answer" in lines[0] and "data.dataset.name: local" in lines[0]
    assert not out.exists()  # not even scenario.yaml
    assert elapsed < 10, f"{elapsed:.1f} s"


def test_cached_dataset_loads_when_the_hub_does_not_answer(no_hub: Path, tmp_path: Path) -> None:
    """A Hub dataset downloaded earlier is read from the datasets cache, with no retries."""
    images = [Image.new("L", (5, 4), color=40 * i) for i in range(6)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    table = datasets.Dataset.from_dict({"image": images, "label": [0, 1] * 3}, features=features)
    table.to_parquet(str(tmp_path / "toy.parquet"))
    datasets.load_dataset("parquet", data_files={"train": str(tmp_path / "toy.parquet")})
    # the cache as a download of Hub dataset someone/toy leaves it: <owner>___<name>/<config>/...
    built = next(p for p in no_hub.glob("parquet/*/*/*") if p.is_dir())
    cached = no_hub / "someone___toy" / "default" / built.parent.name / built.name
    shutil.copytree(built, cached)
    for arrow in cached.glob("parquet-*.arrow"):
        arrow.rename(arrow.with_name(arrow.name.replace("parquet-", "toy-")))

    hf = DATASETS.get("huggingface")
    started = time.perf_counter()
    data = hf.load(hf.Params(path="someone/toy"), seed=0)
    assert time.perf_counter() - started < 10
    assert data.input_shape == (1, 4, 5) and data.y.tolist() == [0, 1] * 3
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # offline mode only while loading
