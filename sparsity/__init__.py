"""Sparsity and pruning methods (unstructured, N:M, structured). Not implemented yet: see the sparsity issue."""
