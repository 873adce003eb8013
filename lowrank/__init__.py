"""Low-rank decomposition: plain, activation-aware (ASVD) and whitened (SVD-LLM) truncated SVD of
Linear layers, with ranks allocated to a parameter budget (`compress lowrank`, or a pipeline
step with `method: svd | asvd | svd_llm`)."""
