"""One torch thread: tests share two cores with other suites (see /work/shared/FACTS.md)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)
