"""Monitoring: TensorBoard scalars/text/figures of a run, and the per-layer width figure."""

from .figures import width_figure
from .run_monitor import RunMonitor

__all__ = ["RunMonitor", "width_figure"]
