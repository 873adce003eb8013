"""Sparsity and pruning: magnitude, Wanda and SparseGPT, unstructured or N:M, stored compressed
(SparseLinear); SparseGPT with joint quantization (SparseQuantLinear); structured pruning that
writes a smaller dense model (structured.py, `compress shrink`)."""
