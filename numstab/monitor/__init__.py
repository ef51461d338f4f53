"""Monitoring someone else's training loop with numstab's diagnostics (docs/monitor.md).

:class:`Monitor` observes a PyTorch model and optimizer inside an ordinary loop;
:func:`jax_step_metrics` computes the same metrics dict from JAX arrays (pure);
:mod:`~numstab.monitor.core` holds the measurements both use. Neither torch nor jax is
imported with this package.
"""

from numstab.monitor.core import batch_metrics, metric_rows, param_metrics, update_metrics
from numstab.monitor.jax_metrics import jax_step_metrics
from numstab.monitor.pytorch import MONITOR_KINDS, Monitor

__all__ = [
    "MONITOR_KINDS",
    "Monitor",
    "batch_metrics",
    "jax_step_metrics",
    "metric_rows",
    "param_metrics",
    "update_metrics",
]
