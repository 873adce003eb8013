"""Structured pruning: remove whole feed-forward channels, attention head groups or decoder layers,
leaving a smaller *dense* model whose config says its new shapes, so that plain transformers
(`AutoModelForCausalLM.from_pretrained`) loads it without this toolkit.

Units and their importance, from one pass of calibration data through the unpruned model:

- `channels`: intermediate channel j of a layer's MLP (row j of gate_proj and up_proj, column j
  of down_proj). Removing it changes the layer's output by W_down[:, j] * a_j, where a_j is the
  channel's activation (down_proj's input). With `compensate` (opt-in), the mean activation is
  folded into a down_proj bias (W_down[:, j] * mean(a_j), as in FLAP), so the error left is the
  fluctuation: score_j = var(a_j) * |W_down[:, j]|^2; without, score_j = E[a_j^2] * |W_down[:, j]|^2.
- `heads`: one key/value head with the query heads that share it (a grouped-query attention
  group, so the grouping stays consistent), scored the same way on o_proj's input columns of
  its query heads (compensation into an o_proj bias).
- `layers`: a whole decoder layer, scored by how much it changes its input: 1 - the mean cosine
  similarity of the hidden state before and after it over the calibration tokens (ShortGPT's
  block influence). No compensation.

Every decoder layer loses the same number of channels or head groups, chosen per layer by score
(the config holds one intermediate size and one head count for all layers). The budget is a
fraction of the decoder layers' weights (their Linear modules'), met as closely as whole units
allow; the result reports what was achieved. Bias compensation needs a config that can declare the biases
(Llama's `mlp_bias` and `attention_bias`); elsewhere it is refused.

Supported models: Llama-style decoders (model.layers[i].mlp.{gate,up,down}_proj and
.self_attn.{q,k,v,o}_proj), which covers Llama, Mistral, Qwen2 and SmolLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.errors import CompressError
from compress.progress import NullProgress, Progress

UNITS = ("channels", "heads", "layers")


@dataclass
class LayerStats:
    """Calibration statistics of one decoder layer (float64 sums over tokens)."""

    mlp_sum: torch.Tensor  # [intermediate] sum of down_proj's input
    mlp_sq: torch.Tensor  # [intermediate] sum of its square
    attn_sum: torch.Tensor  # [heads * head_dim] sum of o_proj's input
    attn_sq: torch.Tensor  # [heads * head_dim]
    cos_sum: float = 0.0  # sum over tokens of cos(hidden in, hidden out)
    tokens: int = 0


@dataclass
class Plan:
    unit: str
    removed: list[list[int]]  # per decoder layer, the channel / group indices removed; for layers, [[i, ...]]
    scores: list[list[float]]  # per decoder layer, every unit's score (layers: one list of all layers)
    params_before: int  # weights of the decoder layers' Linear modules (the budget's whole; norms and biases aside)
    params_removed: int
    compensate: bool

    @property
    def fraction(self) -> float:
        return self.params_removed / self.params_before


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama-style model, or a CompressError saying what is missing."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    kind = getattr(model.config, "model_type", type(model).__name__)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise CompressError(f"structured pruning supports Llama-style decoders (model.model.layers); {kind} has none")
    for name in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.q_proj", "self_attn.k_proj",
                 "self_attn.v_proj", "self_attn.o_proj"):
        try:
            sub = layers[0].get_submodule(name)
        except AttributeError:
            sub = None
        if not isinstance(sub, nn.Linear):
            raise CompressError(f"structured pruning supports Llama-style decoders; {kind}'s layers have no "
                                f"Linear {name}")
    return layers


def _heads(model: nn.Module) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) from the config."""
    c = model.config
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return heads, kv, head_dim


@torch.no_grad()
def collect_stats(model: nn.Module, windows: torch.Tensor, batch_size: int,
                  progress: Progress = NullProgress()) -> list[LayerStats]:
    """One pass of `windows` (long [n, seq_len]) through the model, gathering every layer's stats."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    stats = []
    hooks = []
    for layer in layers:
        s = LayerStats(*(torch.zeros(n, dtype=torch.float64) for n in (
            layer.mlp.down_proj.in_features, layer.mlp.down_proj.in_features,
            layer.self_attn.o_proj.in_features, layer.self_attn.o_proj.in_features)))
        stats.append(s)

        def moments(sum_name: str, sq_name: str, s: LayerStats = s):
            def hook(module, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()  # [tokens, features]
                getattr(s, sum_name).add_(x.sum(0))
                getattr(s, sq_name).add_(x.square().sum(0))
            return hook

        def influence(module, args, kwargs, output, s: LayerStats = s):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # [batch, seq]
            s.cos_sum += cos.double().sum().item()
            s.tokens += cos.numel()

        hooks += [layer.mlp.down_proj.register_forward_pre_hook(moments("mlp_sum", "mlp_sq")),
                  layer.self_attn.o_proj.register_forward_pre_hook(moments("attn_sum", "attn_sq")),
                  layer.register_forward_hook(influence, with_kwargs=True)]
    try:
        with progress.task("Collecting calibration statistics", total=len(windows)) as advance:
            for batch in windows.split(batch_size):
                model(batch.to(device), use_cache=False, logits_to_keep=1)  # the hooks need no logits
                advance(len(batch))
    finally:
        for h in hooks:
            h.remove()
    return stats


def _scores(sums: torch.Tensor, squares: torch.Tensor, tokens: int, weight: torch.Tensor,
            compensate: bool) -> torch.Tensor:
    """Per input column of `weight` [out, in]: the output energy its removal leaves (float64 [in])."""
    mean = sums / tokens
    energy = squares / tokens - (mean.square() if compensate else 0)
    return energy.clamp_min(0) * weight.detach().double().square().sum(0).cpu()


def check_request(unit: str, remove: float, compensate: bool) -> None:
    """What the request alone refuses (before a model is loaded)."""
    if unit not in UNITS:
        raise CompressError(f"unknown unit '{unit}'; choose one of {', '.join(UNITS)}")
    if not 0 < remove < 1:
        raise CompressError(f"--remove must be a fraction of the parameters in (0, 1), got {remove}")
    if unit == "layers" and compensate:
        raise CompressError("--compensate applies to channels and heads, not to whole layers; drop it")


def plan(model: nn.Module, stats: list[LayerStats], unit: str, remove: float, compensate: bool) -> Plan:
    """Which units to remove so that about `remove` of the decoder layers' parameters go."""
    check_request(unit, remove, compensate)
    layers = decoder_layers(model)
    if compensate:
        _check_bias_config(model, unit)
    per_layer = sum(m.weight.numel() for m in layers[0].modules() if isinstance(m, nn.Linear))
    total = per_layer * len(layers)
    hidden = model.config.hidden_size
    heads, kv, head_dim = _heads(model)
    tokens = stats[0].tokens
    if unit == "layers":
        scores = [1 - s.cos_sum / s.tokens for s in stats]
        n = round(remove * len(layers))
        _check_count(n, len(layers), "decoder layers", remove, 1 / len(layers))
        order = sorted(range(len(layers)), key=scores.__getitem__)
        return Plan(unit, [sorted(order[:n])], [scores], total, n * per_layer, False)
    if unit == "channels":
        size = layers[0].mlp.down_proj.in_features
        unit_params = 3 * hidden  # a row of gate_proj and of up_proj, a column of down_proj
        n = round(remove * per_layer / unit_params)
        _check_count(n, size, "feed-forward channels per layer", remove, unit_params / per_layer)
        per_unit = [_scores(s.mlp_sum, s.mlp_sq, tokens, layer.mlp.down_proj.weight, compensate)
                    for s, layer in zip(stats, layers)]
    else:
        rep = heads // kv
        unit_params = 2 * (rep + 1) * head_dim * hidden  # the group's q and o slices, its k and v heads
        n = round(remove * per_layer / unit_params)
        _check_count(n, kv, "key/value head groups per layer", remove, unit_params / per_layer)
        n = _loadable_groups(n, kv, rep, hidden)
        per_unit = [_scores(s.attn_sum, s.attn_sq, tokens, layer.self_attn.o_proj.weight, compensate)
                    .view(kv, rep * head_dim).sum(1) for s, layer in zip(stats, layers)]
    removed = [sorted(torch.argsort(sc)[:n].tolist()) for sc in per_unit]
    return Plan(unit, removed, [sc.tolist() for sc in per_unit], total, n * unit_params * len(layers), compensate)


def _check_count(n: int, available: int, what: str, remove: float, unit_fraction: float) -> None:
    """`n` of `available` units, each `unit_fraction` of the budget's whole, must be 1 to available - 1."""
    if n < 1:
        raise CompressError(f"removing {remove:g} of the parameters is less than one of the {what} "
                            f"({unit_fraction:.3g} of them); ask for at least {unit_fraction / 2:.3g}, or use "
                            f"smaller units")
    if n >= available:
        raise CompressError(f"removing {remove:g} of the parameters would remove {n} of the {available} {what}, "
                            f"leaving none; ask for at most {(available - 1) * unit_fraction:.3g}, or use "
                            f"another unit")


def _loadable_groups(n: int, kv: int, rep: int, hidden: int) -> int:
    """The count of groups to remove nearest `n` that leaves a head count dividing hidden_size:
    transformers' config validation refuses any other (even with head_dim set explicitly)."""
    valid = [g for g in range(1, kv) if hidden % ((kv - g) * rep) == 0]
    if not valid:
        raise CompressError(f"no number of key/value head groups (of {kv}, {rep} query heads each) can be removed "
                            f"leaving a head count that divides the hidden size {hidden}, which transformers "
                            f"requires; use channels or layers")
    return min(valid, key=lambda g: (abs(g - n), g))


def _check_bias_config(model: nn.Module, unit: str) -> None:
    key = "mlp_bias" if unit == "channels" else "attention_bias"
    if not hasattr(model.config, key):
        what = "MLP" if unit == "channels" else "attention"
        raise CompressError(f"--compensate needs a config that can declare the {what} biases ({key}); "
                            f"{model.config.model_type} has none; use --no-compensate")


@torch.no_grad()
def apply(model: nn.Module, p: Plan, stats: list[LayerStats]) -> None:
    """Remove the planned units from `model` in place and rewrite its config to the new shapes."""
    layers = decoder_layers(model)
    config = model.config
    if p.unit == "layers":
        gone = set(p.removed[0])
        kept = [layer for i, layer in enumerate(layers) if i not in gone]
        model.model.layers = nn.ModuleList(kept)
        for i, layer in enumerate(kept):  # the key/value cache is indexed by position
            layer.self_attn.layer_idx = i
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in gone]
        config.num_hidden_layers = len(kept)
        return
    heads, kv, head_dim = _heads(model)
    tokens = stats[0].tokens
    for layer, gone, s in zip(layers, p.removed, stats):
        if p.unit == "channels":
            mlp = layer.mlp
            keep = _kept(mlp.down_proj.in_features, gone, 1)
            bias = _compensation(mlp.down_proj, gone, 1, s.mlp_sum / tokens) if p.compensate else None
            mlp.gate_proj = _rows(mlp.gate_proj, keep, p.compensate)
            mlp.up_proj = _rows(mlp.up_proj, keep, p.compensate)
            mlp.down_proj = _columns(mlp.down_proj, keep, bias)
        else:
            attn, rep = layer.self_attn, heads // kv
            q_keep = _kept(heads * head_dim, gone, rep * head_dim)
            kv_keep = _kept(kv * head_dim, gone, head_dim)
            bias = _compensation(attn.o_proj, gone, rep * head_dim, s.attn_sum / tokens) if p.compensate else None
            attn.q_proj = _rows(attn.q_proj, q_keep, p.compensate)
            attn.k_proj = _rows(attn.k_proj, kv_keep, p.compensate)
            attn.v_proj = _rows(attn.v_proj, kv_keep, p.compensate)
            attn.o_proj = _columns(attn.o_proj, q_keep, bias)  # attention infers the head count from q_proj
    if p.unit == "channels":
        config.intermediate_size = layers[0].mlp.down_proj.in_features
        if p.compensate:
            config.mlp_bias = True
    else:
        left = kv - len(p.removed[0])
        config.head_dim = head_dim  # no longer hidden_size / heads
        config.num_attention_heads = left * (heads // kv)
        config.num_key_value_heads = left
        if p.compensate:
            config.attention_bias = True


def _kept(size: int, gone: list[int], width: int) -> torch.Tensor:
    """Indices [size - len(gone) * width] left when blocks `gone` of `width` indices are removed."""
    mask = torch.ones(size, dtype=torch.bool)
    for g in gone:
        mask[g * width:(g + 1) * width] = False
    return mask.nonzero().squeeze(1)


def _compensation(linear: nn.Linear, gone: list[int], width: int, mean: torch.Tensor) -> torch.Tensor:
    """The bias [out] that adds back the removed input blocks' mean contribution."""
    cols = torch.cat([torch.arange(g * width, (g + 1) * width) for g in gone])
    w = linear.weight.detach()
    extra = w[:, cols].double() @ mean[cols].to(w.device)
    base = linear.bias.detach().double() if linear.bias is not None else 0
    return (extra + base).to(w.dtype)


def _rows(linear: nn.Linear, keep: torch.Tensor, bias: bool) -> nn.Linear:
    """The Linear restricted to output rows `keep`; with `bias`, a (zero) bias if it had none."""
    out = nn.Linear(linear.in_features, len(keep), bias=bias or linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    out.weight.copy_(linear.weight[keep.to(linear.weight.device)])
    if out.bias is not None:
        out.bias.copy_(linear.bias[keep.to(linear.weight.device)] if linear.bias is not None else 0)
    return out


def _columns(linear: nn.Linear, keep: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """The Linear restricted to input columns `keep`, with `bias` if given (else its own)."""
    bias = bias if bias is not None else linear.bias
    out = nn.Linear(len(keep), linear.out_features, bias=bias is not None, device=linear.weight.device,
                    dtype=linear.weight.dtype)
    out.weight.copy_(linear.weight[:, keep.to(linear.weight.device)])
    if bias is not None:
        out.bias.copy_(bias)
    return out
