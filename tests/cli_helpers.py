"""Run the `fedsim` command in this process, as a test would from a shell."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import torch
from rich.console import Console

import fedsim.cli


def run_cli(*args: str | Path) -> tuple[int, str, str]:
    """`fedsim ARGS` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv, fedsim.cli.console, torch.get_num_threads()
    sys.argv = ["fedsim", *map(str, args)]
    fedsim.cli.console = Console(file=out, width=200)  # wide: no wrapped or truncated cells
    code: int | str | None = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                fedsim.cli.main()
            except SystemExit as exit_:
                code = exit_.code
    finally:
        sys.argv, fedsim.cli.console = saved[0], saved[1]
        torch.set_num_threads(saved[2])  # `fedsim run` applies simulation.torch_threads
    return (0 if code is None else code), out.getvalue(), err.getvalue()  # type: ignore[return-value]
