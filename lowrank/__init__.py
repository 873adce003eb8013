"""Low-rank decomposition methods (SVD, activation-aware, whitened). Not implemented yet: see the low-rank issue."""
