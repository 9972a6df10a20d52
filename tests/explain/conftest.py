"""A tiny 2D classifier trained in a second on bright-blob-or-not images, and the seg_run test volume."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

SIZE = 16
RADIUS = 3.0


def blob_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x (n, 1, 16, 16), y (n,), masks (n, 16, 16))``: unit noise; positives add +3 inside a disc."""
    grid = np.indices((SIZE, SIZE)).astype(np.float32)
    x = rng.normal(0.0, 1.0, (n, 1, SIZE, SIZE)).astype(np.float32)
    y = rng.integers(0, 2, n)
    masks = np.zeros((n, SIZE, SIZE), dtype=bool)
    for i in range(n):
        c = rng.uniform(RADIUS + 1, SIZE - RADIUS - 1, 2)
        masks[i] = (grid[0] - c[0]) ** 2 + (grid[1] - c[1]) ** 2 <= RADIUS**2
        if y[i]:
            x[i, 0] += 3.0 * masks[i]
    return x, y, masks


@pytest.fixture(scope="session")
def blob_classifier() -> dict[str, Any]:
    """A conv-ReLU-conv-ReLU-pool-linear binary classifier (2 logits, softmax) trained 40 steps, with a
    held-out positive image ``x`` (1, 1, 16, 16), its blob ``mask`` and the test accuracy."""
    import torch
    from torch import nn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 2),
    )
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(40):
        xb, yb, _ = blob_images(32, rng)
        loss = nn.functional.cross_entropy(model(torch.from_numpy(xb)), torch.from_numpy(yb))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.zero_grad(set_to_none=True)
    xt, yt, mt = blob_images(64, rng)
    with torch.no_grad():
        acc = float((model(torch.from_numpy(xt)).argmax(1).numpy() == yt).mean())
    i = int(np.flatnonzero(yt)[0])
    return {"model": model, "x": torch.from_numpy(xt[i : i + 1]), "mask": mt[i], "accuracy": acc}


@pytest.fixture(scope="session")
def seg_case(seg_run: tuple[Any, Any]) -> dict[str, Any]:
    """Fold-0 network of the 3D blob run, a preprocessed test volume ``x`` (1, 1, 16, 16, 12) and its label."""
    import torch

    from medlens.io import read_image
    from medlens.plan.preprocess import preprocess_case
    from medlens.serve import load_predictor

    ds, run_dir = seg_run
    predictor = load_predictor(run_dir, device="cpu", backend="torch")
    case = ds.test[0]
    image = read_image(ds.root / case.image[0])
    label = read_image(ds.root / str(case.label))
    data, seg, _ = preprocess_case(image, label, predictor.config)
    assert seg is not None
    return {"model": predictor.models[0], "x": torch.from_numpy(data)[None], "mask": seg[0] == 1}
