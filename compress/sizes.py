"""Byte and bit accounting of models and their compressed layers."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn


@dataclass
class SizeReport:
    tensor_bytes: int  # all unique tensors of the model (tied ones once)
    compressed_modules: int
    compressed_weights: int  # weights of the dense layers that compressed modules stand for
    compressed_bytes: int  # bytes that encode those weights (codes, scales, zeros, metadata)

    @property
    def bits_per_weight(self) -> float | None:
        if not self.compressed_weights:
            return None
        return self.compressed_bytes * 8 / self.compressed_weights

    def to_dict(self) -> dict:
        return {**asdict(self), "bits_per_weight": self.bits_per_weight}


def unique_tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each shared (tied) one counted once; works on
    the meta device too (sizes come from shapes and dtypes)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def dense_weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's weight as it is stored now (dense or compressed)."""
    if hasattr(module, "storage_bytes"):
        return module.storage_bytes()
    w = module.weight
    return w.numel() * w.element_size()


def outermost_compressed(model: nn.Module) -> list[nn.Module]:
    """Compressed modules not inside another one (a low-rank module's factors may be compressed
    too; the outer module accounts for them)."""
    found: list[str] = []
    for name, m in model.named_modules():
        if hasattr(m, "storage_bytes") and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return [model.get_submodule(n) for n in found]


def size_report(model: nn.Module) -> SizeReport:
    compressed = [m for m in outermost_compressed(model) if m.num_weights()]  # not views of another's tensors
    return SizeReport(
        tensor_bytes=unique_tensor_bytes(model),
        compressed_modules=len(compressed),
        compressed_weights=sum(m.num_weights() for m in compressed),
        compressed_bytes=sum(m.storage_bytes() for m in compressed),
    )
