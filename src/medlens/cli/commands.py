"""Commands for data, planning, training, prediction, export, the demo and the MedMNIST benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medlens.cli._app import _echo, _progress, app, bench_app, dataset_app


# ---- io -----------------------------------------------------------------------------------------------------
@app.command()
def convert(
    src: Annotated[
        Path, typer.Argument(help="A DICOM series folder, DICOM/NIfTI/NRRD/MHA/PNG/JPEG/TIFF file or .npz.")
    ],
    out: Annotated[Path, typer.Argument(help="Output file: .nii.gz, .nii or .png.")],
    series: Annotated[
        str | None, typer.Option(help="Series to take from a folder with several (UID, number or index).")
    ] = None,
    index: Annotated[str | None, typer.Option(help="Image of an npz to take, e.g. 'train:12'.")] = None,
) -> None:
    """Convert any readable image to NIfTI or PNG, keeping its geometry.

    Example: medlens convert dicom/CT_series/ ct.nii.gz
    """
    from medlens.io.convert import convert as do_convert

    path = do_convert(src, out, series=series, index=index)
    _echo(f"wrote {path}")


@app.command()
def info(
    path: Annotated[Path, typer.Argument(help="An image file or a DICOM folder.")],
) -> None:
    """Show an image's shape, spacing, orientation and modality, or list the series in a DICOM folder.

    Example: medlens info dicom_folder/
    """
    from medlens.io import read_image

    if path.is_dir():
        from medlens.io.dicom import list_series

        rows = list_series(path)
        for n, s in enumerate(rows):
            _echo(f"[{n}] {s}")
        if len(rows) != 1:
            return
    img = read_image(path)
    _echo(repr(img))
    _echo(f"affine (RAS+, mm):\n{img.affine.round(4)}")


# ---- data ---------------------------------------------------------------------------------------------------
@app.command()
def sample(
    name: Annotated[str, typer.Argument(help="brain-tissue or brain-lesion.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset folder to create.")],
    subjects: Annotated[int | None, typer.Option(help="Number of simulated subjects.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same dataset).")] = 0,
    task: Annotated[
        str | None, typer.Option(help="brain-lesion: classification, segmentation or detection.")
    ] = None,
    dim: Annotated[int | None, typer.Option(help="2 for slices, 3 for volumes.")] = None,
    resolution: Annotated[float, typer.Option(help="Voxel size in mm.")] = 2.0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing folder.")] = False,
) -> None:
    """Build a sample dataset from real anatomy shipped with installed packages (no download).

    Example: medlens sample brain-tissue --out data/brain-tissue
    """
    from medlens.data.samples import build_sample

    with _progress(f"simulating {name}") as progress:
        ds = build_sample(
            name,
            out,
            subjects=subjects,
            seed=seed,
            task=task,
            dim=dim,
            resolution=resolution,
            overwrite=overwrite,
            progress=progress,
        )
    _echo(f"wrote {ds.root}: {len(ds.training)} training and {len(ds.test)} test cases ({ds.task})")


@dataset_app.command("import")
def dataset_import(
    kind: Annotated[str, typer.Argument(help="msd, nnunet, medmnist, folder or dicom.")],
    src: Annotated[Path, typer.Argument(help="The source folder or file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset folder to create.")],
    labels_csv: Annotated[
        Path | None, typer.Option("--labels", help="dicom: CSV of labels and metadata.")
    ] = None,
    label_column: Annotated[str, typer.Option(help="dicom: the CSV column holding the label.")] = "label",
    ordinal: Annotated[bool, typer.Option(help="medmnist: the classes are ordered grades.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing folder.")] = False,
) -> None:
    """Import an MSD or nnU-Net folder, a MedMNIST npz, class-per-folder images or a DICOM tree + CSV.

    Example: medlens dataset import medmnist pathmnist.npz --out data/pathmnist
    """
    from medlens.data.importers import import_dataset

    options: dict[str, object] = {"overwrite": overwrite}
    if kind == "dicom":
        options.update(labels_csv=labels_csv, label_column=label_column)
    if kind == "medmnist":
        options["ordinal"] = ordinal
    with _progress(f"importing {kind}") as progress:
        ds = import_dataset(kind, src, out, progress=progress, **options)
    _echo(f"wrote {ds.root}: {len(ds.training)} training and {len(ds.test)} test cases ({ds.task})")


@dataset_app.command("check")
def dataset_check(
    root: Annotated[Path, typer.Argument(help="Dataset folder (with dataset.json).")],
) -> None:
    """Report every problem in a dataset, each with its file; exit code 1 when anything is wrong.

    Example: medlens dataset check data/brain-tissue
    """
    from medlens.data.check import check_dataset

    with _progress("checking") as progress:
        report = check_dataset(root, progress=progress)
    _echo(report.to_text())
    if not report.ok:
        raise typer.Exit(1)


@dataset_app.command("fingerprint")
def dataset_fingerprint(
    root: Annotated[Path, typer.Argument(help="Dataset folder (with dataset.json).")],
) -> None:
    """Write fingerprint.json: the statistics the planner needs (spacing, shapes, intensities, classes, sites).

    Example: medlens dataset fingerprint data/brain-tissue
    """
    from medlens.data.fingerprint import write_fingerprint

    with _progress("fingerprinting") as progress:
        path = write_fingerprint(root, progress=progress)
    _echo(f"wrote {path}")


# ---- plan, train, predict --------------------------------------------------------------------------------------
@app.command()
def plan(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder (with dataset.json).")],
    budget: Annotated[str, typer.Option(help="Training wall-clock budget: 90s, 10m, 1h.")] = "10m",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Where to write plan.json (default DATASET/plan.json).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    measure: Annotated[
        bool, typer.Option(help="Time real training steps (off: estimate from FLOPs).")
    ] = True,
) -> None:
    """Plan a model for a dataset within a compute budget: writes an editable, versioned plan.json.

    Example: medlens plan data/brain-tissue --budget 10m
    """
    from medlens.data.dataset import load_dataset
    from medlens.data.fingerprint import compute_fingerprint
    from medlens.plan.planner import make_plan

    ds = load_dataset(dataset)
    fp = compute_fingerprint(ds)
    the_plan = make_plan(fp, task=ds.task, budget=budget, device=device, measure=measure)
    path = the_plan.save(out or ds.root / "plan.json")
    for reason in the_plan.reasons:
        _echo(f"  - {reason}")
    _echo(f"wrote {path} (default configuration: {the_plan.default_configuration})")


@app.command()
def train(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder (with dataset.json).")],
    plan_path: Annotated[Path, typer.Option("--plan", help="plan.json from 'medlens plan'.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to write.")],
    fold: Annotated[
        str, typer.Option(help="Fold number, a list like 0,1, or 'all' for cross-validation.")
    ] = "0",
    configuration: Annotated[
        str | None, typer.Option(help="Plan configuration (default: the plan's).")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue an interrupted run from its last checkpoint.")
    ] = False,
    cache: Annotated[Path | None, typer.Option(help="Preprocessed cache folder (default RUN/cache).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    sensitivity: Annotated[
        float | None,
        typer.Option(
            help="Classification: choose the decision threshold reaching this validation sensitivity "
            "(e.g. 0.95) instead of Youden's J."
        ),
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(
            help="Classification: start from a medlens run (e.g. 'medlens pretrain'), a fold folder or a "
            ".safetensors file; tensors that do not fit (a head for other classes) are re-initialised."
        ),
    ] = None,
    finetune: Annotated[
        str, typer.Option(help="With --init: 'full' (train everything) or 'head' (freeze the backbone).")
    ] = "full",
    backbone_lr: Annotated[
        float, typer.Option(help="With --init --finetune full: backbone learning rate factor (1 = off).")
    ] = 0.1,
) -> None:
    """Train the planned model on one fold, several, or all (cross-validation). Multi-GPU/multi-node: torchrun.

    Example: medlens train data/brain-tissue --plan data/brain-tissue/plan.json --fold 0 --out runs/bt
    """
    from medlens.tasks.run import train as do_train

    options: dict[str, object] = {} if sensitivity is None else {"sensitivity": sensitivity}
    if init is not None:
        from medlens.tasks.transfer import check_policy, resolve_init

        check_policy(finetune, backbone_lr)  # before anything is written
        resolve_init(init)
        options.update(init=init, finetune=finetune, backbone_lr=backbone_lr)

    results = do_train(
        dataset,
        plan_path,
        out,
        fold=fold,
        configuration=configuration,
        resume=resume,
        cache_dir=cache,
        device=device,
        options=options,
    )
    for r in results:
        score = "n/a" if r.best_score is None else f"{r.best_score:.4f}"
        _echo(
            f"fold {r.fold}: best validation score {score} after {r.iterations} iterations ({r.seconds:.0f} s)"
        )
    _echo(f"run: {out}")


@app.command()
def pretrain(
    dataset: Annotated[Path, typer.Argument(help="Classification dataset folder (labels are not used).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to write.")],
    budget: Annotated[str, typer.Option(help="Wall-clock budget: 90s, 5m, 1h.")] = "5m",
    plan_path: Annotated[
        Path | None,
        typer.Option("--plan", help="Classification plan.json to take the network from (default: plan now)."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Self-supervised (SimCLR) pretraining of the planned classifier's backbone; use the run as --init.

    Example: medlens pretrain data/lesions --out runs/ssl && medlens train data/lesions --plan P --init runs/ssl --out R
    """
    from medlens.tasks.pretrain import pretrain as do_pretrain

    res = do_pretrain(dataset, out, budget=budget, plan_path=plan_path, device=device)
    score = "n/a" if res.best_score is None else f"{-res.best_score:.4f}"
    _echo(f"SimCLR: best validation NT-Xent {score} after {res.iterations} iterations ({res.seconds:.0f} s)")
    _echo(f"encoder weights: {res.weights} (train with --init {out})")


@app.command()
def predict(
    run: Annotated[Path, typer.Argument(help="Run directory from 'medlens train'.")],
    src: Annotated[
        Path, typer.Argument(help="A NIfTI/NRRD/MHA file, a DICOM series folder, or a folder of them.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for label maps.")],
    tta: Annotated[bool, typer.Option(help="Mirroring test-time augmentation (slower).")] = False,
    probabilities: Annotated[bool, typer.Option(help="Also write per-class probability maps.")] = False,
    series: Annotated[
        str | None, typer.Option(help="Series to take from a DICOM folder with several.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    backend: Annotated[
        str,
        typer.Option(help="auto (the one training measured as faster), torch or onnx (ONNX Runtime)."),
    ] = "auto",
    uncertainty: Annotated[
        bool,
        typer.Option(
            help="Also report an uncertainty score and a 'refer' flag at the run's stored referral threshold "
            "(segmentation: OUT/<case>_uncertainty.nii.gz and .json)."
        ),
    ] = False,
    uncertainty_method: Annotated[
        str,
        typer.Option(help="auto (the run's referral method), ensemble (folds), mc_dropout or tta."),
    ] = "auto",
    referral_data: Annotated[
        Path | None,
        typer.Option(
            help="With --uncertainty: first set the referral threshold on the run's validation cases in this "
            "dataset (stored in RUN/run.json)."
        ),
    ] = None,
    referral_fraction: Annotated[
        float, typer.Option(help="With --referral-data: share of validation cases to refer.")
    ] = 0.1,
    dicom_out: Annotated[
        Path | None,
        typer.Option(
            help="Also write DICOM results to this folder (inputs must be DICOM): per series a DICOM-SEG and a "
            "TID 1500 SR of the volumes; per classified image an SR of the probabilities and decision."
        ),
    ] = None,
) -> None:
    """Apply a trained run: segmentation label maps in each input's exact geometry, or a classification's
    classes, probabilities and threshold as OUT/predictions.csv and OUT/predictions.json. With --dicom-out,
    also DICOM-SEG/SR objects in each source's study (e.g. to store back to a PACS).

    Example: medlens predict runs/bt scans/ --out predictions/ --uncertainty
    """
    from medlens.serve import load_predictor

    if uncertainty:
        from medlens.explain.uncertainty import check_referral, decide_referral

        if referral_data is not None:
            ref = decide_referral(
                run, referral_data, fraction=referral_fraction, method=uncertainty_method, device=device
            )
            _echo(f"referral threshold {ref['threshold']:.4f} ({ref['method']}): {ref['reason']}")
        uncertainty_method = check_referral(run, uncertainty_method)
        backend = "torch" if backend == "auto" else backend  # MC-dropout needs the PyTorch modules
    elif referral_data is not None:
        _echo("--referral-data is used with --uncertainty; ignored")
    hooks: dict[str, object] = {}
    if dicom_out is not None:
        from medlens.serve.dicom_out import check_dicom_inputs, dicom_writer

        check_dicom_inputs(src, series)  # before any prediction: a NIfTI input cannot give a SEG
        hooks["on_result"] = dicom_writer(dicom_out, run)
    predictor = load_predictor(run, device=device, backend=backend)
    paths = predictor.predict_path(
        src, out, tta=tta, probabilities=probabilities, series=series,
        **({"uncertainty": True, "uncertainty_method": uncertainty_method} if uncertainty else {}),
        **hooks,
    )  # fmt: skip
    for p in paths:
        _echo(f"wrote {p}")


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run directory from 'medlens train'.")],
    fmt: Annotated[str, typer.Option("--format", help="onnx or torchscript.")] = "onnx",
    fold: Annotated[str, typer.Option(help="Fold number, a list like 0,1, or 'all'.")] = "all",
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Folder for fold_K.onnx/.ts (default: RUN/fold_K/model.onnx/.ts)."),
    ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset version.")] = 17,
    tolerance: Annotated[
        float, typer.Option(help="Largest accepted |logit difference| from PyTorch.")
    ] = 1e-3,
) -> None:
    """Export a run's networks to ONNX or TorchScript, checked against PyTorch on random and real inputs.

    Example: medlens export runs/bt --format onnx
    """
    from medlens.serve.run_export import export_run

    for result in export_run(run, fmt, fold=fold, out_dir=out, opset=opset, tolerance=tolerance):
        _echo(f"wrote {result.path}: {result.check.summary()}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the data, run and report.")] = Path(
        "medlens-demo"
    ),
    budget: Annotated[str, typer.Option(help="Training budget for the segmentation model.")] = "3m30s",
    subjects: Annotated[int | None, typer.Option(help="Simulated subjects in brain-tissue.")] = None,
    lesion_budget: Annotated[str, typer.Option(help="Training budget for the lesion classifier.")] = "90s",
) -> None:
    """The main job: sample data -> plan -> train -> predict held-out subjects -> evaluate -> HTML report.

    Example: medlens demo --out medlens-demo
    """
    from medlens.demo import run_demo

    result = run_demo(out, budget=budget, subjects=subjects, lesion_budget=lesion_budget)
    _echo(f"report: {result.report}")
    _echo(f"mean Dice on {result.num_test} held-out subjects: {result.mean_dice:.3f}")
    _echo(f"lesion AUC on {result.lesion_num_test} held-out slices: {result.lesion_auc:.3f}")


# ---- benchmarks ------------------------------------------------------------------------------------------------
@bench_app.command("medmnist")
def bench_medmnist(
    npz: Annotated[
        Path, typer.Option("--npz", help="A MedMNIST .npz (e.g. pathmnist.npz, organmnist3d_64.npz).")
    ],
    budget: Annotated[str, typer.Option(help="Training wall-clock budget: 90s, 5m, 1h.")] = "5m",
    size: Annotated[
        int | None,
        typer.Option(help="Network input size (default: the planner's; the file's own for MedMNIST)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Keep the run here (default: a temporary folder).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Train on a MedMNIST file's train split (selecting on val), test once, and print ACC/AUC next to the
    published MedMNIST v2 ResNet-18 results.

    Example: medlens bench medmnist --npz pathmnist.npz --budget 5m
    """
    from rich.console import Console
    from rich.table import Table

    from medlens.tasks.medmnist import PUBLISHED_SOURCE
    from medlens.tasks.medmnist import bench_medmnist as run_bench

    result = run_bench(npz, budget=budget, size=size, out=out, device=device)
    table = Table(title=f"{result.dataset} ({result.classification_type}), test set, MedMNIST's ACC and AUC")
    for col in ("method", "AUC [95% CI]", "ACC [95% CI]"):
        table.add_column(col)
    for row in result.table():
        table.add_row(*row)
    Console().print(table)
    if not result.published:
        _echo(
            "no published results for this file name (MedMNIST names: pathmnist.npz, chestmnist_64.npz, ...)"
        )
    _echo(f"published: {PUBLISHED_SOURCE}")
    s = result.seconds
    _echo(
        f"time: {s['total']:.0f} s (training {s['train']:.0f} s, {result.train_images_per_second:.0f} images/s; "
        f"preprocessing {s['preprocess']:.0f} s; test {s['test']:.0f} s)"
    )
    if out is not None:
        _echo(f"run: {out} (apply it with 'medlens predict {out} IMAGE --out DIR')")
