"""Kernels for adapter branches: the fused low-rank node and dropout (each module states the devices and
dtypes it serves)."""
