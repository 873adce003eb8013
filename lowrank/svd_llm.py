"""Whitened SVD (Wang et al. 2024, "SVD-LLM: Truncation-aware Singular Value Decomposition for
Large Language Model Compression"): decompose W L, L the Cholesky factor of the calibration
Gram matrix XᵀX, so that dropping a singular value costs exactly its square in output error
and the truncation is the best of its rank for the calibration inputs. The Gram matrix is the
same statistic as GPTQ's Hessian, collected by the same code."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from compress.quant.hessians import SharedHessians

from .config import LowRankCompressor, LowRankConfig
from .svd_math import Factorization, whitened_svd, whitening_factor


class SVDLLMConfig(LowRankConfig):
    """SVD of the weight whitened by the calibration inputs' Gram matrix (SVD-LLM)."""

    method: Literal["svd_llm"] = "svd_llm"
    damp: float = Field(0.01, gt=0, le=1, description="Dampening added to the Gram matrix's diagonal, as a "
                        "fraction of its mean (raised automatically, with a warning, if it is not positive definite).")
    needs_calibration: ClassVar[bool] = True

    def build(self) -> SVDLLMCompressor:
        return SVDLLMCompressor(self)


class SVDLLMCompressor(LowRankCompressor):
    def __init__(self, config: SVDLLMConfig) -> None:
        super().__init__(config)
        self.grams = SharedHessians(config.method)

    def observe(self, name: str, module: nn.Linear, x: torch.Tensor) -> None:
        self.grams.observe(name, x)

    def factorize(self, name: str, module: nn.Linear) -> tuple[Factorization, torch.Tensor | None]:
        gram = self.grams.take(name)
        return whitened_svd(module.weight, whitening_factor(gram, self.config.damp, name)), gram
