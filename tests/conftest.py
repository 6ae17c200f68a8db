"""Fixtures shared by test modules; a module opts in with
`pytestmark = pytest.mark.usefixtures("one_thread")`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Thread policy is the caller's: one thread keeps tiny models fast and repeatable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
