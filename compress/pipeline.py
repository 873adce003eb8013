"""Pipeline files: a model, calibration data, an ordered list of steps, evaluation and an output.

    model: smollm2-135m            # prepared name, folder, .gguf file or hub id
    steps:
      - method: rtn                # a registered method; the other keys are its config's fields
        bits: 4
        group_size: 64
    eval: {data: wiki}             # or null to skip evaluation
    output: out/smollm2-int4       # relative to the working directory

Everything is validated (types, ranges, unknown keys, methods, regexes) before a model is loaded,
and errors name the location (`steps[0].bits`) and the valid choices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError

from .errors import CompressError
from .evaluate import EvalConfig
from .interfaces import MethodConfig
from .registry import method_config, suggest
from .targets import check_patterns


class CalibrationConfig(BaseModel):
    """The `calibration:` section: data for methods that need it (EVAL.md defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str = Field("news", description="Calibration text: news, wiki, a text file or folder, or hf:<dataset>.")
    split: str = Field("train", description="Split of an hf: dataset.")
    text_field: str = Field("text", description="Text column of an hf: dataset.")
    samples: int = Field(64, ge=1, description="Number of calibration sequences.")
    seq_len: int = Field(512, ge=2, description="Tokens per calibration sequence.")
    batch_size: int = Field(8, ge=1, description="Calibration samples run through a decoder layer at once "
                            "(more is faster, and holds more activations in flight).")
    offload: Literal["cpu", "disk"] = Field(
        "cpu", description="Where activations wait between decoder layers: cpu (memory), or disk (next to the "
        "output, only the batch in flight in memory; for models whose activations do not fit in memory).",
    )
    layers: str | None = Field(
        None, description="The decoder layers, when they cannot be found automatically: their class name or a "
        "'re:' pattern of their module names.",
    )


class Pipeline(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = Field(1, description="Pipeline file format version.")
    model: str = Field(description="Prepared name, local folder, .gguf file or hub id.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="Dtype the model is loaded and evaluated in (the protocol uses float32)."
    )
    device: str = Field("cpu", pattern=r"^(cpu|auto|cuda(:\d+)?)$", description=(
        "cpu, cuda, cuda:N, or auto: the GPU if there is one; compression computes one layer at a time on it, and "
        "evaluation spreads a model over several GPUs with accelerate's device map."))
    trust_remote_code: bool = Field(False, description="Run model code shipped with the model (only if you trust it).")
    allow_pickle: bool = Field(False, description="Accept pickle (.bin) weights (only if you trust them).")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    steps: list[SerializeAsAny[MethodConfig]] = Field(min_length=1, description="Compression steps, in order.")
    eval: EvalConfig | None = Field(default_factory=EvalConfig, description="Evaluation; null to skip.")
    output: str | None = Field(None, description="Checkpoint folder to write; none to only evaluate.")


def parse(raw: Any, where: str = "pipeline") -> Pipeline:
    """Validate a pipeline mapping (as loaded from YAML) into a Pipeline."""
    if not isinstance(raw, dict):
        raise CompressError(f"{where}: expected a mapping with model and steps, got {type(raw).__name__}")
    steps = raw.get("steps")
    if not isinstance(steps, list) or not steps:
        raise CompressError(f"{where}: steps: expected a non-empty list of steps, each with a 'method' key")
    configs = [parse_step(step, f"{where}: steps[{i}]") for i, step in enumerate(steps)]
    try:
        return Pipeline.model_validate({**raw, "steps": configs})
    except ValidationError as e:
        raise CompressError(f"{where}: {describe_error(e, Pipeline)}") from None


def parse_step(step: Any, where: str) -> MethodConfig:
    if not isinstance(step, dict) or "method" not in step:
        raise CompressError(f"{where}: expected a mapping with a 'method' key, got {step!r}")
    try:
        cls = method_config(str(step["method"]))
    except CompressError as e:
        raise CompressError(f"{where}.method: {e}") from None
    try:
        config = cls.model_validate(step)
    except ValidationError as e:
        raise CompressError(f"{where}.{describe_error(e, cls)}") from None
    try:
        check_patterns(config.targets + config.ignore)
    except CompressError as e:
        raise CompressError(f"{where}: {e}") from None
    return config


def describe_error(error: ValidationError, model: type[BaseModel]) -> str:
    """One line for the first validation error: location, problem, valid choices."""
    first = error.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    more = error.error_count() - 1
    tail = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    if first["type"] == "extra_forbidden":
        valid = _field_names(model, first["loc"][:-1])
        key = str(first["loc"][-1])
        return f"{loc}: unknown key (valid keys: {', '.join(valid)}){suggest(key, valid)}{tail}"
    if first["type"] == "missing":
        return f"{loc}: required key is missing{tail}"
    return f"{loc}: {first['msg']} (got {first['input']!r}){tail}"


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model at `loc`."""
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            break
        model = inner[0]
    return list(model.model_fields)


def load_file(path: str | Path, overrides: list[str] = ()) -> Pipeline:
    """Read, override (`key.path=value`) and validate a pipeline YAML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CompressError(f"pipeline file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CompressError(f"cannot read pipeline file {path}: {e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise CompressError(f"{path}{line}: malformed YAML: {problem}") from None
    for item in overrides:
        apply_override(raw, item)
    return parse(raw, str(path))


def apply_override(raw: Any, item: str) -> None:
    """Set `a.b.0.c=value` in a loaded mapping; the value is parsed as YAML (3 -> int, true -> bool)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise CompressError(f"--set {item}: expected KEY=VALUE, e.g. steps.0.bits=3")
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise CompressError(f"--set {item}: {where} is not an index of a list of {len(node)} item(s)")
            part = int(part)
        elif not isinstance(node, dict):
            raise CompressError(f"--set {item}: {'.'.join(parts[:depth])} is not a mapping or list")
        if last:
            node[part] = yaml.safe_load(value) if value else None
        else:
            if isinstance(node, dict) and part not in node:
                node[part] = {}
            node = node[part]
