"""Evaluation: per-case metrics, bootstrap confidence intervals over cases, and summaries per class and group.

* :mod:`~medlens.evaluate.segmentation`: Dice, Jaccard, HD95, ASD, NSD per class for one case (MONAI).
* :mod:`~medlens.evaluate.bootstrap`: percentile bootstrap CIs, paired differences, unpaired group gaps.
* :mod:`~medlens.evaluate.summary`: per-case records -> JSON-able summary; metrics JSON + CSV writers.
* :mod:`~medlens.evaluate.classification`: accuracy, balanced accuracy, precision, recall, specificity, F1,
  AUC and confusion matrix with bootstrap CIs; MedMNIST's own ACC and AUC.

Importing this package is cheap: torch and MONAI are imported only when a metric is computed.
"""

from __future__ import annotations

from medlens.evaluate.bootstrap import CI, bootstrap_ci, group_gap_ci, paired_difference_ci
from medlens.evaluate.classification import (
    classification_metrics,
    medmnist_acc,
    medmnist_auc,
    point_metrics,
)
from medlens.evaluate.segmentation import HIGHER_IS_BETTER, METRICS, UNITS, segmentation_metrics
from medlens.evaluate.summary import case_record, load_metrics, per_case_csv, summarise, write_metrics

__all__ = [
    "CI",
    "HIGHER_IS_BETTER",
    "METRICS",
    "UNITS",
    "bootstrap_ci",
    "case_record",
    "classification_metrics",
    "group_gap_ci",
    "load_metrics",
    "medmnist_acc",
    "medmnist_auc",
    "paired_difference_ci",
    "per_case_csv",
    "point_metrics",
    "segmentation_metrics",
    "summarise",
    "write_metrics",
]
