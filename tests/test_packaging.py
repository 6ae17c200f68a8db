"""The wheel installs attacks/ and defenses/ as fedsim.attacks and fedsim.defenses, never as
top-level `attacks` / `defenses`, with every module of the source tree; installed, it imports."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"fedsim": ROOT / "fedsim", "fedsim/attacks": ROOT / "attacks", "fedsim/defenses": ROOT / "defenses"}


def test_wheel_holds_every_module_under_fedsim_and_imports(tmp_path: Path) -> None:
    tree = tmp_path / "src"  # a copy: building in place would leave build/ in the checkout
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    for folder in ("fedsim", "attacks", "defenses"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(tree)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("fedsim-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    expected = {
        f"{package}/{path.relative_to(folder).as_posix()}"
        for package, folder in SOURCES.items()
        for path in folder.rglob("*.py")
        if not (package == "fedsim" and path.relative_to(folder).parts[0] in ("attacks", "defenses"))
    }
    assert expected <= names, sorted(expected - names)
    assert not any(n.startswith(("attacks/", "defenses/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "attacks = fedsim.attacks" in text and "defenses = fedsim.defenses" in text

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True
    )
    probe = (
        "import fedsim.attacks.dlg, fedsim.defenses.dp_sgd, importlib.util as u; "
        "print(fedsim.attacks.__file__); print(u.find_spec('attacks'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    location, top_level = done.stdout.split()
    assert location.startswith(str(site)) and top_level == "None"
