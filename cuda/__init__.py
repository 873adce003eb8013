"""Kernels for compressed layers: `torch.library` ops (ops.py) over a load-time weight layout
(layout.py), Triton kernels (triton_int.py), the per-shape choice among them and library
kernels (int_matmul.py, tuning.py), and PyTorch's packed CPU and CUDA int4/int8 kernels
(cpu_packed.py, tinygemm.py)."""
