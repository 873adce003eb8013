"""Sparsity and pruning: magnitude, Wanda and SparseGPT, unstructured or N:M, stored compressed
(SparseLinear). Structured pruning is still to come (see the sparsity issue)."""
