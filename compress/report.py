"""Rich rendering for the CLI: progress bars, step reports, evaluation tables, manifests.

Only the CLI imports this module (libraries log and call progress callbacks; the CLI talks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from .evaluate import EvalResult
from .runner import RunResult, StepReport


class RichProgress:
    """The Progress protocol as rich bars on stderr; one live display shared by nested tasks."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._bars: Progress | None = None
        self._depth = 0

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        if self._bars is None:
            self._bars = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), console=self.console, transient=True,
            )
            self._bars.start()
        bars = self._bars
        self._depth += 1
        task_id = bars.add_task(description, total=total)
        try:
            yield lambda n=1: bars.advance(task_id, n)
        finally:
            bars.remove_task(task_id)
            self._depth -= 1
            if self._depth == 0:
                bars.stop()
                self._bars = None


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def steps_table(steps: list[StepReport]) -> Table:
    t = Table(title="Steps")
    for col in ("#", "method", "modules", "format", "bytes before", "bytes after", "bits/weight", "rel. error (mean/max)",
                "time"):
        t.add_column(col, justify="right" if col not in ("method", "format") else "left")
    for s in steps:
        d = s.summary()
        t.add_row(str(s.index), s.method, str(d["modules"]), ", ".join(d["formats"]), human_bytes(d["bytes_before"]),
                  human_bytes(d["bytes_after"]), f"{d['bits_per_weight']:.3f}",
                  f"{d['mean_rel_error']:.4f} / {d['max_rel_error']:.4f}", f"{d['seconds']:.1f} s")
    return t


def eval_table(columns: list[tuple[str, EvalResult | None, int | None, float | None]], title: str) -> Table:
    """One column per model: (label, eval result, bytes on disk, bits per weight of compressed layers)."""
    t = Table(title=title)
    t.add_column("metric")
    for label, *_ in columns:
        t.add_column(label, justify="right")
    rows: list[tuple[str, Callable[[EvalResult | None, int | None, float | None], str]]] = [
        ("perplexity (wiki)", lambda e, b, w: _num(e and e.perplexity, ".3f")),
        ("KL vs base (nats/token)", lambda e, b, w: _num(e and e.kl, ".4f")),
        ("top-1 agreement", lambda e, b, w: _num(e and e.top1 and e.top1 * 100, ".2f") + ("%" if e and e.top1 else "")),
        ("size on disk", lambda e, b, w: human_bytes(b)),
        ("bits/weight (compressed layers)", lambda e, b, w: _num(w, ".3f")),
        ("prefill tokens/s", lambda e, b, w: _num(e and e.prefill_tps, ".1f")),
        ("decode tokens/s" + (" (compiled)" if any(e and e.decode_compiled for _, e, *_ in columns) else ""),
         lambda e, b, w: _num(e and e.decode_tps, ".2f")),
    ]
    for name, cell in rows:
        t.add_row(name, *(cell(e, b, w) for _, e, b, w in columns))
    return t


def run_tables(result: RunResult) -> list[Table]:
    tables: list[Table] = [steps_table(result.steps)]
    if result.eval is not None:
        tables.append(eval_table(
            [("uncompressed", result.base_eval, result.base_disk_bytes, _dense_bits(result)),
             ("compressed", result.eval, result.disk_bytes, result.size.bits_per_weight)],
            title=f"{result.model} on {result.eval.device}",
        ))
    return tables


def _dense_bits(result: RunResult) -> float:
    """Bits per weight the layers of the first step had before compression."""
    first = result.steps[0]
    return first.bytes_before * 8 / sum(m.weights for m in first.modules)


def manifest_tables(manifest: dict[str, Any]) -> list[Table]:
    head = Table(title="Checkpoint", show_header=False)
    head.add_column("key")
    head.add_column("value")
    head.add_row("format", f"{manifest['format']} v{manifest['version']}")
    head.add_row("created by", ", ".join(f"{k} {v}" for k, v in manifest["created_by"].items()))
    head.add_row("base model", f"{manifest['base_model']['ref']} ({manifest['base_model']['model_type']})")
    head.add_row("tensor bytes", human_bytes(manifest["tensor_bytes"]))
    steps = Table(title="Steps")
    for col in ("#", "method", "version", "config", "modules", "bits/weight"):
        steps.add_column(col)
    for i, s in enumerate(manifest["steps"]):
        config = ", ".join(f"{k}={v}" for k, v in s["config"].items() if k != "method")
        steps.add_row(str(i), s["method"], str(s["version"]), config, str(s["report"]["modules"]),
                      f"{s['report']['bits_per_weight']:.3f}")
    layers = Table(title="Compressed modules")
    for col in ("module", "format", "scheme", "shape (out x in)", "bytes", "bits/weight"):
        layers.add_column(col)
    for name, entry in manifest["modules"].items():
        spec = entry["spec"]  # Linear formats' out x in, or embeddings' tokens x features
        shape = (spec.get("out_features", spec.get("num_embeddings")), spec.get("in_features", spec.get("embedding_dim")))
        bits = f"{entry['bytes'] * 8 / entry['weights']:.3f}" if entry["weights"] else "-"  # tied: another's tensors
        layers.add_row(name, entry["format"], entry["scheme"], f"{shape[0]} x {shape[1]}", human_bytes(entry["bytes"]),
                       bits)
    return [head, steps, layers]
