"""The pure tensor math of low-rank decomposition: factorize a weight, truncate it, and predict
the error of every truncation from its spectrum.

Every method writes the weight as W = U diag(s) R, U [out, k] with orthonormal columns, s [k]
descending, R [k, in] (k = min(out, in)):
- plain SVD: W = U S Vᵀ, R = Vᵀ;
- activation-aware (ASVD): W D = U S Vᵀ with D = diag(mean |x_j|^alpha), so R = Vᵀ D⁻¹;
- whitened (SVD-LLM): W L = U S Vᵀ with L the Cholesky factor of the calibration Gram matrix
  H = XᵀX (L Lᵀ = H), so R = Vᵀ L⁻¹ and truncation minimises the output error ||(W - W_r) Xᵀ||.
Keeping the first r components gives the factors up = U_r S_r^½ [out, r], down = S_r^½ R_r [r, in]
(the singular values split evenly, so both factors have the same scale for a later quantizer).

Because U's columns are orthonormal, the cross terms of a truncation's output error vanish:
||(W - W_r) Xᵀ||² = Σ_{i≥r} s_i² · R_i H R_iᵀ, so one spectrum predicts every rank's error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from compress.errors import CompressError

log = logging.getLogger(__name__)


@dataclass
class Factorization:
    u: torch.Tensor  # [out, k] float64, orthonormal columns
    s: torch.Tensor  # [k] float64, descending
    r: torch.Tensor  # [k, in] float64

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(up [out, rank], down [rank, in]), float64, with up @ down the rank-`rank` truncation."""
        root = self.s[:rank].sqrt()
        return self.u[:, :rank] * root, root[:, None] * self.r[:rank]

    def energy_tail(self) -> torch.Tensor:
        """[k + 1]: the fraction of Σ s² discarded when keeping rank 0..k (1 down to 0)."""
        return _tail(self.s.square()) / self.s.square().sum().clamp_min(1e-300)

    def output_error_tail(self, hessian: torch.Tensor) -> torch.Tensor:
        """[k + 1]: the output error ||(W - W_r) Xᵀ||² / ||W Xᵀ||² of keeping rank 0..k, for the
        calibration Gram matrix `hessian` [in, in] (any positive scale)."""
        h = hessian.to(self.r)
        per = self.s.square() * ((self.r @ h) * self.r).sum(dim=1)  # [k]: s_i² R_i H R_iᵀ
        tail = _tail(per.clamp_min(0))
        return tail / tail[0].clamp_min(1e-300)


def _tail(values: torch.Tensor) -> torch.Tensor:
    """[k] -> [k + 1]: tail[r] = Σ_{i≥r} values_i (tail[k] = 0)."""
    flipped = values.flip(0).cumsum(0).flip(0)
    return torch.cat([flipped, flipped.new_zeros(1)])


def _svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(matrix, full_matrices=False)


def plain_svd(weight: torch.Tensor) -> Factorization:
    """weight [out, in] -> its SVD, in float64."""
    u, s, vt = _svd(weight.detach().double())
    return Factorization(u, s, vt)


def activation_aware_svd(weight: torch.Tensor, mean_abs: torch.Tensor, alpha: float) -> Factorization:
    """ASVD: scale input channel j by mean_abs[j]^alpha ([in], from calibration), decompose, fold
    the scaling back into R. Channels that never fired get the smallest nonzero scale."""
    scale = mean_abs.double().to(weight.device)
    floor = scale[scale > 0].min() if (scale > 0).any() else torch.ones((), dtype=scale.dtype, device=scale.device)
    scale = scale.clamp_min(floor).pow(alpha)  # [in]
    u, s, vt = _svd(weight.detach().double() * scale)
    return Factorization(u, s, vt / scale)


def whitening_factor(hessian: torch.Tensor, damp: float, where: str) -> torch.Tensor:
    """L [in, in] lower triangular, float64, with L Lᵀ = H + d·mean(diag H)·I. d starts at `damp`
    and grows tenfold (with a warning) until H is positive definite; up to 1."""
    h = hessian.double()
    mean_diag = h.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    d = damp
    while True:
        factor, info = torch.linalg.cholesky_ex(h + d * mean_diag * eye)
        if int(info) == 0:
            if d != damp:
                log.warning("%s: calibration Gram matrix not positive definite; dampened with %.3g instead of %.3g",
                            where, d, damp)
            return factor
        if d >= 1:
            raise CompressError(f"{where}: the calibration Gram matrix stays singular even with dampening 1 "
                                "(are its inputs all zero or not finite?); ignore this layer")
        d = min(max(d * 10, 1e-8), 1.0)


def whitened_svd(weight: torch.Tensor, whitening: torch.Tensor) -> Factorization:
    """SVD-LLM: decompose W L (L from whitening_factor), R = Vᵀ L⁻¹ (a triangular solve)."""
    w = weight.detach().double()
    l = whitening.to(w)
    u, s, vt = _svd(w @ l)
    # R = Vᵀ L⁻¹  <=>  Lᵀ Rᵀ = V: one triangular solve with Lᵀ (upper).
    r = torch.linalg.solve_triangular(l.T, vt.T, upper=True).T
    return Factorization(u, s, r)
