"""Request and response models of the inference service (they make its OpenAPI schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class Health(BaseModel):
    """Liveness and load."""

    status: Literal["ok"] = Field(description="Always 'ok' when the server answers.")
    models: int = Field(description="Number of models served.")
    active_jobs: int = Field(description="Jobs queued or running now.")
    capacity: int = Field(description="Jobs that may be queued or running at once (more get HTTP 429).")


class ModelInfo(BaseModel):
    """One served model."""

    name: str = Field(description="The model's name: its run folder's name. Use it in /models/{name}/...")
    task: str = Field(description="'segmentation' or 'classification'.")
    backend: str = Field(description="Inference backend: 'torch' (PyTorch) or 'onnx' (ONNX Runtime).")
    labels: list[str] = Field(description="Class names (segmentation labels or classification classes).")
    ndim: int | None = Field(None, description="Image dimensionality the model expects (2 or 3).")
    channels: list[str] = Field(description="Input channels, in order.")
    uncertainty: bool = Field(description="Whether jobs can ask for uncertainty and the refer flag.")


class ModelList(BaseModel):
    """Every served model."""

    models: list[ModelInfo]


class ModelCard(BaseModel):
    """A model card: RUN/model_card.json when the run has one, else the essentials of run.json."""

    source: str = Field(description="'model_card.json' or 'run.json'.")
    card: dict[str, Any] = Field(description="The card's content.")


class PacsJobRequest(BaseModel):
    """A job on a study already in the PACS the server is configured for (server-side config only)."""

    study: str = Field(description="StudyInstanceUID.", examples=["1.2.826.0.1.3680043.8.498.1"])
    series: str | None = Field(None, description="SeriesInstanceUID (default: the study's only series).")


class ResultFile(BaseModel):
    """One downloadable result."""

    name: str = Field(description="File name; download it from /jobs/{id}/files/{name}.")
    url: str = Field(description="Download path (needs the same Bearer token).")
    media_type: str
    bytes: int
    description: str


class JobResults(BaseModel):
    """What a finished job produced."""

    files: list[ResultFile] = Field(description="Downloadable files (label map, probabilities, SEG/SR ...).")
    label_map: str | None = Field(None, description="Download path of the label map (segmentation).")
    volumes_ml: dict[str, float] | None = Field(None, description="Volume of each segmented class, in mL.")
    probabilities: dict[str, float] | None = Field(None, description="Class probabilities (classification).")
    prediction: str | None = Field(None, description="Predicted class (binary and multiclass).")
    labels: list[str] | None = Field(None, description="Positive labels (multilabel).")
    grade: str | None = Field(None, description="Predicted grade (ordinal).")
    threshold: float | dict[str, float] | None = Field(None, description="Decision threshold(s) used.")
    uncertainty: float | None = Field(None, description="Case-level uncertainty score, when asked for.")
    refer: bool | None = Field(
        None,
        description="True when the uncertainty is above the run's referral threshold: have a human read it.",
    )
    seconds: float | None = Field(None, description="Prediction time, seconds.")


class JobStatus(BaseModel):
    """A job's state and, when done, its results."""

    id: str = Field(description="Job id (32 hex digits).")
    model: str
    input: Literal["nifti", "dicom", "pacs"] = Field(description="What the job was given.")
    state: Literal["queued", "running", "done", "failed"]
    error: str | None = Field(None, description="Why the job failed.")
    created: float = Field(description="Unix time.")
    started: float | None = None
    finished: float | None = None
    status_url: str
    results: JobResults | None = None


class ViewerLink(BaseModel):
    """A link that opens the job's viewer in a browser."""

    url: str = Field(
        description="Open within expires_in seconds; it works once and sets a cookie for the viewer."
    )
    expires_in: int


class Problem(BaseModel):
    """An error."""

    detail: str
