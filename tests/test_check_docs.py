"""benchmarks/check_docs.py's machinery on a synthetic doc (not its real, expensive checks)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = importlib.util.spec_from_file_location("check_docs", ROOT / "benchmarks" / "check_docs.py")
check_docs = sys.modules["check_docs"] = importlib.util.module_from_spec(SPEC)  # dataclasses look it up
SPEC.loader.exec_module(check_docs)
Check = check_docs.Check

DOC = """# Results

`fedsim run a.yaml` ends at accuracy 0.950.

`fedsim run b.yaml`: DLG reaches 42.0 dB.

An unsourced figure: 7.5 dB.
"""


def test_drift_is_reported_and_exits_1(tmp_path: Path, capsys) -> None:
    (tmp_path / "doc.md").write_text(DOC)
    checks = [
        Check("doc.md", r"accuracy (\d+\.\d+)", "fedsim run a.yaml", lambda: 0.952, 0.005, fast=True),
        Check("doc.md", r"reaches (\d+\.\d+) dB", "fedsim run b.yaml", lambda: 30.0, 0.5, fast=True),
        Check("doc.md", r"figure: ([0-9.]+) dB", "fedsim run c.yaml", lambda: 7.5, 0.5, fast=True),
        Check("doc.md", r"epsilon ([0-9.]+)", "fedsim run a.yaml", lambda: 1.0, 0.1, fast=True),
        Check("doc.md", r"reaches (\d+\.\d+) dB", "fedsim run b.yaml", lambda: 1 / 0, 0.5),
    ]
    assert check_docs.main(["--fast"], checks, tmp_path) == 1  # the slow, failing check is skipped
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len(rows) == 4
    assert rows[0].endswith("| 0.95 | 0.952 | 0.005 | ok |")
    assert rows[1].endswith("| 42 | 30 | 0.5 | DRIFT |")
    assert rows[2].endswith("| UNNAMED |")  # its command is not named next to it
    assert rows[3].endswith("| MISSING |")


def test_all_ok_exits_0(tmp_path: Path) -> None:
    (tmp_path / "doc.md").write_text(DOC)
    check = Check("doc.md", r"accuracy (\d+\.\d+)", "fedsim run a.yaml", lambda: 0.95, 0.005)
    assert check_docs.main([], [check], tmp_path) == 0


def test_every_registered_number_is_in_its_doc_next_to_its_command() -> None:
    """Each real check's pattern matches its doc exactly once, with its command nearby (no
    measurement: that is what `python benchmarks/check_docs.py` does)."""
    located = {(check.doc, check.pattern): check_docs.locate(check, ROOT) for check in check_docs.CHECKS}
    assert {key: status for key, (_, status) in located.items() if status != "ok"} == {}
    assert len(check_docs.CHECKS) >= 25
    assert {check.doc for check in check_docs.CHECKS} >= {
        "README.md", "docs/defenses.md", "docs/baselines.md", "docs/gifd.md",
        "docs/model_inversion.md", "docs/quantum_privacy.md", "docs/privacy_auditing.md",
    }  # fmt: skip
