"""Method tests run on tiny tensors: one intra-op thread is several times faster on a shared
2-core machine (thread hand-off dominates), and it is restored after each test."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
