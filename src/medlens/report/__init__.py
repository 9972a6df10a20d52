"""Reports: a self-contained HTML builder (:class:`Report`) and the figures it embeds.

Importing this package does not import matplotlib; the figure functions import it when called.
"""

from __future__ import annotations

from medlens.report.figures import overlay_figure, per_case_bar_figure, training_curve_figure
from medlens.report.html import Report

__all__ = ["Report", "overlay_figure", "per_case_bar_figure", "training_curve_figure"]
