"""compress: make large language models smaller and faster.

Python API (the CLI is a thin layer over it):

    import compress
    model = compress.load("out/smollm2-int4")            # transformers model, compressed modules in place
    result = compress.run("examples/smollm2-int4.yaml")  # or a dict, or a compress.pipeline.Pipeline
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from .pipeline import Pipeline
    from .runner import RunResult

try:
    __version__ = version("compress-llm")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"


def load(ref: str | Path, device: str = "cpu", dtype: str = "float32", trust_remote_code: bool = False) -> nn.Module:
    """A compressed checkpoint (or any model reference) as a transformers model in eval mode."""
    from .loading import load_model

    return load_model(str(ref), dtype, device, trust_remote_code)[0]


def run(pipeline: Pipeline | dict[str, Any] | str | Path, output: str | Path | None = None,
        overwrite: bool = False, resume: bool = False) -> RunResult:
    """Run a pipeline (object, mapping, or YAML file path); returns its RunResult."""
    from . import pipeline as pipeline_module
    from .runner import run as run_pipeline

    if isinstance(pipeline, (str, Path)):
        pipeline = pipeline_module.load_file(Path(pipeline))
    elif isinstance(pipeline, dict):
        pipeline = pipeline_module.parse(pipeline)
    return run_pipeline(pipeline, output, overwrite=overwrite, resume=resume)
