"""AWQ: activation-aware scaling folded into the preceding operation, then quantization.

Per decoder layer (through the calibration engine):
1. observe: each targeted Linear's input Gram matrix H = X^T X and mean |x| per channel;
2. prepare_layer: group the targets by the module that produces their shared input (found by
   the engine from the forward pass, e.g. a norm feeding q/k/v); when that producer can absorb
   a per-channel scale (a norm's weight, or a Linear's output rows) and nothing else consumes its
   output, search the scales (awq_math.search_scales) and fold them: producer / s, weights * s.
   Linear-to-linear pairs whose link is not a plain tensor hand-over (up_proj -> down_proj
   through the gated activation, v_proj -> o_proj through attention) come from `mappings`;
3. compress: round-to-nearest on a grid whose per-group range is clipped to minimise the
   group's output error (awq_math.clipped_grid), in the QuantLinear format of RTN and GPTQ.
"""

from __future__ import annotations

import logging
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from compress.errors import CompressError
from compress.targets import matches

from .awq_math import clipped_grid, search_scales
from .config import IntWeightConfig
from .layers import QuantLinear
from .quantize import cast_grid, compute_grid, quantize

logger = logging.getLogger(__name__)


class AWQConfig(IntWeightConfig):
    """AWQ weight quantization: activation-aware scales folded into the preceding op, clipped grids."""

    method: Literal["awq"] = "awq"
    n_grid: int = Field(20, ge=1, le=100, description="Scale exponents tried per mapping (0, 1/n, ..., (n-1)/n).")
    duo_scaling: bool = Field(True, description="Scales from activation and weight magnitudes (else activations).")
    clip: bool = Field(True, description="Search each group's clipping range to minimise its output error.")
    mappings: list[tuple[str, str]] = Field(
        default_factory=lambda: [("up_proj", "down_proj"), ("v_proj", "o_proj")],
        description="Linear -> Linear smoothing pairs (patterns as in targets) whose link the forward pass does "
        "not show; applied when the shapes agree. Norm -> Linear pairs are found from the model's structure.",
    )

    needs_calibration: ClassVar[bool] = True

    def build(self) -> AWQCompressor:
        return AWQCompressor(self)


class AWQCompressor:
    def __init__(self, config: AWQConfig) -> None:
        self.config = config
        self.hessians: dict[str, torch.Tensor] = {}  # name -> X^T X [in, in] fp32 (a sum, not a mean)
        self.abs_sums: dict[str, torch.Tensor] = {}  # name -> sum over tokens of |x| [in]
        self.tokens: dict[str, int] = {}
        self.scaled: list[str] = []  # mappings applied, for the log

    def observe(self, name: str, module: nn.Linear, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()  # [tokens, in]
        if name not in self.hessians:
            self.hessians[name] = torch.zeros(rows.shape[1], rows.shape[1], device=rows.device)
            self.abs_sums[name] = torch.zeros(rows.shape[1], device=rows.device)
            self.tokens[name] = 0
        self.hessians[name].addmm_(rows.T, rows)
        self.abs_sums[name] += rows.abs().sum(0)
        self.tokens[name] += rows.shape[0]

    # --- scale search and folding -------------------------------------------------------------
    @torch.no_grad()
    def prepare_layer(self, model: nn.Module, layer_name: str, names: list[str],
                      producers: dict[str, str | None], consumers: dict[str, set[str]]) -> None:
        groups: dict[str, list[str]] = {}
        for name in names:
            if producers.get(name) is not None:
                groups.setdefault(producers[name], []).append(name)
        for producer, members in groups.items():
            if consumers.get(producer, set()) <= set(members):  # no one else reads the producer's output
                self._balance(model, producer, members)
        for source_pattern, target_pattern in self.config.mappings:
            for name in names:
                if producers.get(name) is not None or not matches(target_pattern, name, model.get_submodule(name)):
                    continue
                sources = [n for n, m in model.get_submodule(layer_name).named_modules(prefix=layer_name)
                           if isinstance(m, nn.Linear) and matches(source_pattern, n, m)]
                if len(sources) == 1:
                    self._balance(model, sources[0], [name])

    def _balance(self, model: nn.Module, producer_name: str, members: list[str]) -> None:
        c = self.config
        producer = model.get_submodule(producer_name)
        linears = [model.get_submodule(n) for n in members]
        n_in = linears[0].in_features
        if not _can_absorb(producer, n_in):
            return
        gs = c.group_size_for(members[0], n_in, linears[0].out_features)
        h = self.hessians[members[0]]
        act_mean = self.abs_sums[members[0]] / self.tokens[members[0]]
        s, ratio, err, plain = search_scales([m.weight for m in linears], h, act_mean, c.bits, gs, c.symmetric,
                                             c.torch_scale_dtype(), c.n_grid, c.duo_scaling)
        if ratio == 0.0 and err >= plain:
            return  # no scaling helps: leave the layer as it is
        if not _absorb(producer, 1 / s):
            logger.warning("awq: %s does not scale its output through its weight; %s left unscaled",
                           producer_name, ", ".join(members))
            return
        for name, m in zip(members, linears):
            m.weight.mul_(s.to(m.weight.dtype))  # [out, in] * [in]
            # the inputs are now x / s: their statistics follow
            self.hessians[name] = self.hessians[name] / s[:, None] / s[None, :]
            self.abs_sums[name] = self.abs_sums[name] / s
        self.scaled.append(f"{producer_name} -> {', '.join(members)} (a={ratio:.2f}, error x{err / plain:.3f})")
        logger.info("awq: scaled %s", self.scaled[-1])

    # --- quantization -----------------------------------------------------------------------
    @torch.no_grad()
    def compress(self, name: str, module: nn.Linear) -> QuantLinear:
        c = self.config
        if name not in self.hessians:
            raise CompressError(f"awq: {name} saw no calibration inputs (is it used in the forward pass?)")
        h = self.hessians.pop(name)
        self.abs_sums.pop(name)
        w = module.weight.detach()
        gs = c.group_size_for(name, module.in_features, module.out_features)
        if c.clip:
            grid = clipped_grid(w, h, c.bits, gs, c.symmetric, c.torch_scale_dtype())
        else:
            grid = cast_grid(compute_grid(w, c.bits, gs, c.symmetric), c.torch_scale_dtype())
        return QuantLinear.from_codes(quantize(w, grid), grid, module.bias, c.scale_dtype)


def _can_absorb(producer: nn.Module, channels: int) -> bool:
    """Whether `producer`'s output channels can be rescaled through its parameters: a Linear
    (its rows) or an elementwise-affine module such as RMSNorm/LayerNorm (its 1-D weight)."""
    if isinstance(producer, nn.Linear):
        return producer.out_features == channels
    weight = getattr(producer, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.numel() == channels


def _absorb(producer: nn.Module, factor: torch.Tensor) -> bool:
    """Multiply `producer`'s output channels by factor [channels] through its parameters, and
    check on a random input that its output really scaled (a norm computing x * (1 + weight)
    would not); if not, restore it and return False."""
    params = [t for t in (producer.weight, getattr(producer, "bias", None)) if isinstance(t, torch.Tensor)]
    saved = [t.clone() for t in params]
    n_in = producer.in_features if isinstance(producer, nn.Linear) else factor.numel()
    x = torch.randn(4, n_in, generator=torch.Generator().manual_seed(0)).to(producer.weight)
    before = producer(x).float()
    if isinstance(producer, nn.Linear):
        producer.weight.mul_(factor[:, None].to(producer.weight.dtype))
    else:
        producer.weight.mul_(factor.to(producer.weight.dtype))
    if len(params) == 2:
        params[1].mul_(factor.to(params[1].dtype))
    after = producer(x).float()
    if torch.allclose(after, before * factor.float(), rtol=1e-3, atol=1e-6 * before.abs().max().item()):
        return True
    for t, s in zip(params, saved):
        t.copy_(s)
    return False
