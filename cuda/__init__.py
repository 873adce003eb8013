"""GPU kernels for low-bit and sparse matmuls. Not implemented yet: see the kernels issue."""
