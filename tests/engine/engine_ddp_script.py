"""Trains the blob classifier under torchrun; every rank saves its final weights (run by test_distributed)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from engine_tiny_tasks import BlobsTask

from medlens.engine import Trainer, save_weights, seed_everything
from medlens.models import create_model


def main(run_dir: Path) -> None:
    rank = int(os.environ["RANK"])
    seed_everything(rank)  # different initial weights per rank: DDP must make them equal
    model = create_model({"name": "test_classifier"}, spatial_dims=2, in_channels=1, out_channels=2)
    cfg = {
        "iterations": 40,
        "val_every": 20,
        "checkpoint_every": 20,
        "checkpoint_seconds": 0.5,  # exercises rank 0 deciding time-based checkpoints for everyone
        "threads": 1,
        "precision": "fp32",
        "optimizer": {"lr": 0.01},
    }
    result = Trainer(model, BlobsTask(batch_size=8), cfg, run_dir, progress=False).fit()
    save_weights(model, run_dir / f"rank{rank}.safetensors")
    summary = {"best_score": result.best_score, "iterations": result.iterations, "val": result.history["val"]}
    (run_dir / f"rank{rank}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
