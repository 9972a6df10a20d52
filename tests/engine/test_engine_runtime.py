"""Device, threads, precision and RNG state."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from medlens.engine.runtime import (
    configure_threads,
    cpu_supports_bf16,
    device_for,
    resolve_precision,
    rng_state,
    set_rng_state,
)
from medlens.errors import InputError


def test_device_for() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert device_for("auto").type == expected
    assert device_for("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="unknown device 'gpu0'"):
        device_for("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU is available"):
            device_for("cuda")


def test_resolve_precision_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_supports_bf16() else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(InputError, match="Did you mean 'fp16'"):
        resolve_precision("fp61", cpu)


def test_configure_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr("medlens.engine.runtime.available_cores", lambda: 8)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert configure_threads(None, workers=2) == 3  # (8 cores - 2 workers) / 2 processes
        with pytest.raises(InputError, match="threads must be a positive integer"):
            configure_threads(0)
    finally:
        torch.set_num_threads(before)


def test_rng_state_round_trips_through_json() -> None:
    state = json.loads(json.dumps(rng_state()))
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert first[2] == again[2]
