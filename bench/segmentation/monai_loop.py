"""Peer (c): a plain MONAI UNet loop as written in MONAI's spleen segmentation tutorial
(``3d_segmentation/spleen_segmentation_3d.ipynb``), run as its own process by ``run.py``.

Kept from the tutorial: UNet 3D, channels (16, 32, 64, 128, 256), strides (2, 2, 2, 2), 2 residual units, batch
norm; DiceLoss(to_onehot_y, softmax); Adam 1e-4; CacheDataset (cache_rate 1, 4 workers); DataLoader batch size 2,
shuffled, 4 workers; RandCropByPosNegLabeld 96^3, pos 1, neg 1, 4 samples, image_threshold 0; validation every
2 epochs with sliding_window_inference roi 160^3, sw_batch_size 4, DiceMetric without background, the best
model by validation Dice kept; test inference with the same sliding window, Invertd back to the input
geometry and argmax; ``set_determinism(seed=0)``.

Adapted, because the 4-class brain MR data forces it (each marked ``ADAPTED`` below):

1. ``ScaleIntensityRanged(a_min=-57, a_max=164)`` is a CT window in Hounsfield units; this is MR with
   arbitrary, per-scanner units, so ``NormalizeIntensityd(nonzero=True)`` (z-score over the brain) replaces it.
   CropForegroundd moves before it so the foreground is still "intensity > 0" (the skull-stripped brain;
   after z-scoring half the brain is negative).
2. ``Spacingd(pixdim=(1.5, 1.5, 2.0))`` is the spleen data's target spacing; the brain data is 2 mm
   isotropic, so ``pixdim=(2, 2, 2)`` (its own grid) instead of upsampling it.
3. 4 classes: ``out_channels=4``, ``AsDiscrete(to_onehot=4)``.
4. The cropped brains (about 80x100x85 voxels at 2 mm) are smaller than the 96^3 crop, which
   RandCropByPosNegLabeld refuses; ``SpatialPadd(96^3)`` is added before it.
5. ``max_epochs=600`` becomes a wall-clock deadline: epochs run while the next one (and its validation) fits
   before ``--deadline``, and the last epoch always validates, so the kept model has been scored.
6. Device: CUDA when present, else CPU (the tutorial hard-codes ``cuda:0``).

``train`` writes ``best_metric_model.pth`` and ``train_summary.json``; ``predict`` writes ``<case>.nii.gz``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

NUM_CLASSES = 4  # ADAPTED (3): background, CSF, GM, WM
ROI = (160, 160, 160)
SW_BATCH = 4
CROP = (96, 96, 96)


def _pre_transforms(keys: list[str]) -> list[Any]:
    """The deterministic part shared by train, validation and test (ADAPTED 1 and 2)."""
    from monai.transforms import (
        CropForegroundd,
        EnsureChannelFirstd,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        Spacingd,
    )

    modes = ("bilinear", "nearest")[: len(keys)]
    return [
        LoadImaged(keys=keys),
        EnsureChannelFirstd(keys=keys),
        CropForegroundd(keys=keys, source_key="image"),
        Orientationd(keys=keys, axcodes="RAS"),
        Spacingd(keys=keys, pixdim=(2.0, 2.0, 2.0), mode=modes),
        NormalizeIntensityd(keys=["image"], nonzero=True),
    ]


def _model(device: Any) -> Any:
    from monai.networks.layers import Norm
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=NUM_CLASSES,
        channels=(16, 32, 64, 128, 256),
        strides=(2, 2, 2, 2),
        num_res_units=2,
        norm=Norm.BATCH,
    ).to(device)


def train(files: dict[str, Any], out: Path, deadline: float, workers: int) -> None:
    import torch
    from monai.data import CacheDataset, DataLoader, decollate_batch
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceLoss
    from monai.metrics import DiceMetric
    from monai.transforms import AsDiscrete, Compose, RandCropByPosNegLabeld, SpatialPadd
    from monai.utils import set_determinism

    started = time.time()
    set_determinism(seed=0)
    train_transforms = Compose(
        [
            *_pre_transforms(["image", "label"]),
            SpatialPadd(keys=["image", "label"], spatial_size=CROP),  # ADAPTED (4)
            RandCropByPosNegLabeld(
                keys=["image", "label"],
                label_key="label",
                spatial_size=CROP,
                pos=1,
                neg=1,
                num_samples=4,
                image_key="image",
                image_threshold=0,
            ),
        ]
    )
    val_transforms = Compose(_pre_transforms(["image", "label"]))
    train_ds = CacheDataset(
        data=files["train"], transform=train_transforms, cache_rate=1.0, num_workers=workers
    )
    train_loader = DataLoader(train_ds, batch_size=2, shuffle=True, num_workers=workers)
    val_ds = CacheDataset(data=files["val"], transform=val_transforms, cache_rate=1.0, num_workers=workers)
    val_loader = DataLoader(val_ds, batch_size=1, num_workers=workers)

    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")  # ADAPTED (6)
    model = _model(device)
    loss_function = DiceLoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    dice_metric = DiceMetric(include_background=False, reduction="mean")
    val_interval = 2
    post_pred = Compose([AsDiscrete(argmax=True, to_onehot=NUM_CLASSES)])
    post_label = Compose([AsDiscrete(to_onehot=NUM_CLASSES)])

    best_metric, best_epoch = -1.0, -1
    samples = iterations = 0
    history: list[dict[str, Any]] = []
    train_s: list[float] = []
    val_s: list[float] = []
    first_epoch = time.time()
    epoch = 0
    while True:  # ADAPTED (5): the tutorial's `for epoch in range(600)`, bounded by the deadline
        t0 = time.time()
        model.train()
        epoch_loss, step = 0.0, 0
        for batch_data in train_loader:
            step += 1
            inputs, labels = batch_data["image"].to(device), batch_data["label"].to(device)
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = loss_function(outputs, labels)
            loss.backward()
            optimizer.step()
            epoch_loss += loss.item()
            samples += int(inputs.shape[0])
            iterations += 1
        train_s.append(time.time() - t0)
        expected_val = val_s[-1] if val_s else 0.3 * train_s[-1]
        last = time.time() + train_s[-1] + expected_val > deadline
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": epoch_loss / max(step, 1),
            "seconds": train_s[-1],
        }
        if (epoch + 1) % val_interval == 0 or last:
            v0 = time.time()
            model.eval()
            with torch.no_grad():
                for val_data in val_loader:
                    val_inputs, val_labels = val_data["image"].to(device), val_data["label"].to(device)
                    val_logits: Any = sliding_window_inference(val_inputs, ROI, SW_BATCH, model)
                    val_outputs = [post_pred(i) for i in decollate_batch(val_logits)]
                    val_labels = [post_label(i) for i in decollate_batch(val_labels)]
                    dice_metric(y_pred=val_outputs, y=val_labels)
                aggregated: Any = dice_metric.aggregate()
                metric = float(aggregated.item())
                dice_metric.reset()
            if metric > best_metric:
                best_metric, best_epoch = metric, epoch + 1
                torch.save(model.state_dict(), out / "best_metric_model.pth")
            val_s.append(time.time() - v0)
            record["val_dice"] = metric
        history.append(record)
        print(json.dumps(record), flush=True)
        epoch += 1
        if last:
            break
    summary = {
        "epochs": epoch,
        "iterations": iterations,
        "train_samples": samples,
        "sample_voxels": CROP[0] * CROP[1] * CROP[2],
        "best_metric": best_metric,
        "best_epoch": best_epoch,
        "seconds_setup": first_epoch - started,
        "seconds_train_epochs": train_s,
        "seconds_validation": val_s,
        "threads": torch.get_num_threads(),
        "workers": workers,
        "history": history,
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))


def predict(files: dict[str, Any], out: Path, model_path: Path, workers: int) -> None:
    import nibabel as nib
    import numpy as np
    import torch
    from monai.data import DataLoader, Dataset, decollate_batch
    from monai.inferers import sliding_window_inference
    from monai.transforms import AsDiscreted, Compose, Invertd

    test_org_transforms = Compose(_pre_transforms(["image"]))
    test_org_ds = Dataset(data=files["test"], transform=test_org_transforms)
    test_org_loader = DataLoader(test_org_ds, batch_size=1, num_workers=workers)
    post_transforms = Compose(
        [
            Invertd(
                keys="pred",
                transform=test_org_transforms,
                orig_keys="image",
                meta_keys="pred_meta_dict",
                orig_meta_keys="image_meta_dict",
                meta_key_postfix="meta_dict",
                nearest_interp=False,
                to_tensor=True,
            ),
            AsDiscreted(keys="pred", argmax=True),
        ]
    )
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    model = _model(device)
    model.load_state_dict(torch.load(model_path, map_location=device, weights_only=True))
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for test_data in test_org_loader:
            test_inputs = test_data["image"].to(device)
            test_data["pred"] = sliding_window_inference(test_inputs, ROI, SW_BATCH, model)
            for item in [post_transforms(i) for i in decollate_batch(test_data)]:
                pred = item["pred"]
                case = item["case"]
                labels = np.asarray(pred.cpu().numpy()[0], dtype=np.uint8)
                affine = np.asarray(pred.affine.cpu().numpy(), dtype=np.float64)
                nib.save(nib.Nifti1Image(labels, affine), str(out / f"{case}.nii.gz"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train until the deadline")
    t.add_argument("--files", type=Path, required=True, help="JSON with train/val/test lists of file dicts")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--deadline", type=float, required=True, help="Unix time by which training must end")
    t.add_argument("--workers", type=int, default=4, help="CacheDataset/DataLoader workers (tutorial: 4)")
    p = sub.add_parser("predict", help="predict the test images")
    p.add_argument("--files", type=Path, required=True)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--workers", type=int, default=4)
    args = parser.parse_args(argv)
    files = json.loads(args.files.read_text())
    if args.command == "train":
        args.out.mkdir(parents=True, exist_ok=True)
        train(files, args.out, args.deadline, args.workers)
    else:
        predict(files, args.out, args.model, args.workers)


if __name__ == "__main__":
    main()
