"""numstab: what floating-point arithmetic does to neural-network training."""

__version__ = "0.1.0"
