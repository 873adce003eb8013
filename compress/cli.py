"""The `compress` command: a thin Typer layer over the Python API.

Errors meant for users (CompressError) print as one line on stderr with exit code 1; Ctrl-C
exits 130. Progress goes to stderr, results to stdout (tables, or JSON with --json).
"""

from __future__ import annotations

import json
import sys
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import CompressError, Interrupted

app = typer.Typer(help="Make large language models smaller and faster.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
models_app = typer.Typer(help="Prepare and list the packaged real models.", no_args_is_help=True)
app.add_typer(models_app, name="models")

out = Console(soft_wrap=True)
err = Console(stderr=True)

Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last finished layer "
                                      "(OUT.partial); the pipeline must be the same.")]
DEVICE_HELP = "cpu, cuda, cuda:N, or auto (the GPU if there is one; several GPUs share a model too big for one)."
Device = Annotated[str, typer.Option(help=DEVICE_HELP)]
TrustRemote = Annotated[bool, typer.Option("--trust-remote-code", help="Run code shipped with the model.")]
Ignore = Annotated[Optional[list[str]], typer.Option(help="Modules to leave alone (repeatable).")]
Targets = Annotated[Optional[list[str]], typer.Option(help="Modules to compress (repeatable).")]
Evaluate = Annotated[bool, typer.Option("--eval/--no-eval", help="Run the evaluation protocol too.")]
Samples = Annotated[Optional[int], typer.Option(help="Calibration sequences [64].")]
SeqLen = Annotated[Optional[int], typer.Option(help="Tokens per calibration sequence [512].")]
Offload = Annotated[Optional[str], typer.Option(
    help="Where activations wait between layers: cpu or disk (for models whose activations do not fit) [cpu].")]
RunDtype = Annotated[str, typer.Option(help="Activation dtype: float32 (EVAL.md's protocol), bfloat16 or float16. "
                                            "Compressed layers keep their storage; on CPU, bfloat16 runs the "
                                            "packed int4/int8 kernels.")]


def main() -> None:
    app()


def _friendly(fn):
    """Turn user errors, Ctrl-C and out-of-memory into one line and a non-zero exit code."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        _quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except Interrupted as e:
            err.print(str(e), highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        except CompressError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted; no partial output was left behind")
            raise typer.Exit(130) from None
        except (MemoryError, _torch_oom()):
            err.print("[bold red]error:[/] out of memory; lower calibration.samples or calibration.seq_len (the "
                      "activations kept between layers), or eval.windows; an interrupted compression keeps its "
                      "finished layers in OUT.partial: rerun with --resume")
            raise typer.Exit(1) from None

    return wrapper


def _torch_oom() -> type[BaseException]:
    import torch

    return torch.OutOfMemoryError


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _progress(quiet: bool):
    from .progress import NullProgress
    from .report import RichProgress

    return NullProgress() if quiet else RichProgress(err)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _show(*tables: Table) -> None:
    for t in tables:
        out.print(t)


# --- models --------------------------------------------------------------------------------
@models_app.command("prepare")
@_friendly
def models_prepare(name: Annotated[str, typer.Argument(help="A packaged model name (see `compress models list`).")],
                   quiet: Quiet = False, json_: Json = False) -> None:
    """Build the cached Hugging Face folder of a packaged model (idempotent); print where it is."""
    from .models import prepare, prepared_dir

    existed = (prepared_dir(name) / "config.json").is_file()
    path = prepare(name, _progress(quiet))
    if json_:
        _print_json({"name": name, "path": str(path), "already_prepared": existed})
    else:
        out.print(f"{name} {'already prepared' if existed else 'prepared'} at {path}", highlight=False)


@models_app.command("list")
@_friendly
def models_list(json_: Json = False) -> None:
    """Show the packaged models and where the prepared ones are."""
    from .models import KNOWN_MODELS, prepared_models

    rows = [{"name": n, "prepared": p is not None, "path": str(p) if p else None,
             "description": KNOWN_MODELS[n].description} for n, p in prepared_models()]
    if json_:
        return _print_json(rows)
    t = Table(title="Models")
    for col in ("name", "prepared", "path", "description"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], "yes" if r["prepared"] else "no", r["path"] or "-", r["description"])
    _show(t)


# --- compressing ---------------------------------------------------------------------------
def _run_and_report(pipeline, output: Optional[str], overwrite: bool, resume: bool, quiet: bool, json_: bool) -> None:
    from .report import run_tables
    from .runner import run

    result = run(pipeline, output, overwrite=overwrite, resume=resume, progress=_progress(quiet or json_))
    if json_:
        return _print_json(result.to_dict())
    _show(*run_tables(result))
    if result.output:
        out.print(f"checkpoint written to {result.output}", highlight=False)
    else:
        out.print("no output folder given: nothing was written", highlight=False)


@app.command()
@_friendly
def quantize(
    model: Annotated[str, typer.Argument(help="Prepared name, model folder, .gguf file or hub id.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Checkpoint folder to write.")],
    method: Annotated[str, typer.Option(help="Quantization method (see `compress methods`).")] = "rtn",
    bits: Annotated[Optional[int], typer.Option(help="Bits per weight, 2 to 8 [method's default: 4].")] = None,
    group_size: Annotated[Optional[int], typer.Option(
        help="Columns per scale; -1 for per-channel [method's default: 128].")] = None,
    symmetric: Annotated[Optional[bool], typer.Option(
        "--symmetric/--asymmetric", help="Grid around zero, or min/max [method's default: symmetric].")] = None,
    ignore: Ignore = None,
    targets: Targets = None,
    evaluate: Evaluate = False,
    samples: Samples = None,
    seq_len: SeqLen = None,
    offload: Offload = None,
    device: Device = "cpu",
    trust_remote_code: TrustRemote = False,
    overwrite: Overwrite = False,
    resume: Resume = False,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """Quantize a model's Linear layers and write a compressed checkpoint.

    Options left out take the method's defaults (`compress methods METHOD`); calibrated methods
    use the protocol's calibration data (news, 64 x 512 tokens).
    """
    given = {"bits": bits, "group_size": group_size, "symmetric": symmetric, "ignore": ignore, "targets": targets}
    calibration = {"samples": samples, "seq_len": seq_len, "offload": offload}
    pipeline = _one_step(model, output, method, given, calibration, device, trust_remote_code, evaluate, "quantize")
    _run_and_report(pipeline, None, overwrite, resume, quiet, json_)


def _one_step(model: str, output: str, method: str, given: dict[str, Any], calibration: dict[str, Any], device: str,
              trust_remote_code: bool, evaluate: bool, where: str):
    """The pipeline of a one-step command: options left out (None) take the method's defaults."""
    from .pipeline import parse

    step: dict[str, Any] = {"method": method, **{k: v for k, v in given.items() if v is not None}}
    raw = {"model": model, "device": device, "trust_remote_code": trust_remote_code, "steps": [step],
           "calibration": {k: v for k, v in calibration.items() if v is not None}, "output": output,
           **({} if evaluate else {"eval": None})}
    return parse(raw, where)


@app.command()
@_friendly
def prune(
    model: Annotated[str, typer.Argument(help="Prepared name, model folder, .gguf file or hub id.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Checkpoint folder to write.")],
    method: Annotated[str, typer.Option(help="Pruning method: magnitude, wanda or sparsegpt.")] = "sparsegpt",
    sparsity: Annotated[Optional[float], typer.Option(
        help="Fraction of weights to prune, unstructured [method's default: 0.5].")] = None,
    pattern: Annotated[Optional[str], typer.Option(
        help="unstructured, or N:M (N of every M input weights pruned, e.g. 2:4) [unstructured].")] = None,
    allocation: Annotated[Optional[str], typer.Option(
        help="Per-layer ratios: uniform, or owl (outlier-weighted, the mean kept; wanda and sparsegpt, "
             "unstructured) [uniform].")] = None,
    bits: Annotated[Optional[int], typer.Option(
        help="Also quantize the kept weights to this many bits, 2 to 8 (sparsegpt only; in the same pass "
             "unless --separate) [no quantization].")] = None,
    group_size: Annotated[Optional[int], typer.Option(
        help="With --bits: dense input columns per scale; -1 for per-channel [128].")] = None,
    joint: Annotated[Optional[bool], typer.Option(
        "--joint/--separate", help="With --bits: prune and quantize in one pass, or prune then quantize the "
                                   "kept weights in a second pass [joint].")] = None,
    ignore: Ignore = None,
    targets: Targets = None,
    evaluate: Evaluate = False,
    samples: Samples = None,
    seq_len: SeqLen = None,
    offload: Offload = None,
    device: Device = "cpu",
    trust_remote_code: TrustRemote = False,
    overwrite: Overwrite = False,
    resume: Resume = False,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """Prune a model's Linear layers (unstructured or N:M) and write a compressed checkpoint.

    The achieved sparsity and pattern of every layer are verified on the stored weights. With
    --bits (sparsegpt), the kept weights are quantized too: 2:4 + 4-bit takes about 20% of the
    bf16 bytes.
    """
    from .registry import method_config, methods

    if "pattern" not in method_config(method).model_fields:
        pruners = sorted(name for name, cls in methods().items() if "pattern" in cls.model_fields)
        raise CompressError(f"prune: '{method}' is not a pruning method; use one of {', '.join(pruners)}")
    quantize = {k: v for k, v in {"bits": bits, "group_size": group_size, "joint": joint}.items() if v is not None}
    if quantize and "bits" not in quantize:
        raise CompressError("prune: --group-size and --joint/--separate set how the kept weights are quantized; "
                            "add --bits to quantize them")
    if quantize and "quantize" not in method_config(method).model_fields:
        joint_methods = sorted(name for name, cls in methods().items() if "quantize" in cls.model_fields)
        raise CompressError(f"prune: '{method}' does not quantize the kept weights (--bits); use "
                            f"{', '.join(joint_methods)}, or quantize in a later pipeline step")
    given = {"sparsity": sparsity, "pattern": pattern, "allocation": allocation, "quantize": quantize or None,
             "ignore": ignore, "targets": targets}
    calibration = {"samples": samples, "seq_len": seq_len, "offload": offload}
    pipeline = _one_step(model, output, method, given, calibration, device, trust_remote_code, evaluate, "prune")
    _run_and_report(pipeline, None, overwrite, resume, quiet, json_)


@app.command()
@_friendly
def lowrank(
    model: Annotated[str, typer.Argument(help="Prepared name, model folder, .gguf file or hub id.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Checkpoint folder to write.")],
    method: Annotated[str, typer.Option(help="Decomposition: svd (plain), asvd (activation-aware) or svd_llm "
                                             "(whitened).")] = "svd_llm",
    keep: Annotated[Optional[float], typer.Option(
        help="Fraction of parameters to keep, of the targeted layers (or of the model with --scope model) [0.8].")] = None,
    scope: Annotated[Optional[str], typer.Option(help="What --keep is a fraction of: targets or model [targets].")] = None,
    allocation: Annotated[Optional[str], typer.Option(
        help="How ranks are spread: uniform, energy or sensitivity [uniform].")] = None,
    rank: Annotated[Optional[int], typer.Option(help="A fixed rank for every layer instead of --keep.")] = None,
    ignore: Ignore = None,
    targets: Targets = None,
    evaluate: Evaluate = False,
    samples: Samples = None,
    seq_len: SeqLen = None,
    offload: Offload = None,
    device: Device = "cpu",
    trust_remote_code: TrustRemote = False,
    overwrite: Overwrite = False,
    resume: Resume = False,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """Replace Linear layers by two low-rank factors and write a compressed checkpoint.

    Ranks meet the parameter budget within one rank step per layer; a layer whose factors would
    not be smaller than its weight stays dense.
    """
    from .registry import method_config, methods

    if "keep" not in method_config(method).model_fields:  # the low-rank budget: only decompositions have it
        low_rank = sorted(name for name, cls in methods().items() if "keep" in cls.model_fields)
        raise CompressError(f"lowrank: '{method}' is not a low-rank method; use one of {', '.join(low_rank)}")
    given = {"keep": keep, "scope": scope, "allocation": allocation, "rank": rank, "ignore": ignore,
             "targets": targets}
    calibration = {"samples": samples, "seq_len": seq_len, "offload": offload}
    pipeline = _one_step(model, output, method, given, calibration, device, trust_remote_code, evaluate, "lowrank")
    _run_and_report(pipeline, None, overwrite, resume, quiet, json_)


@app.command()
@_friendly
def shrink(
    model: Annotated[str, typer.Argument(help="Prepared name, model folder, .gguf file or hub id.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Model folder to write (plain transformers).")],
    unit: Annotated[str, typer.Option(help="What to remove: channels (feed-forward), heads (key/value groups "
                                           "with their query heads) or layers.")] = "channels",
    remove: Annotated[float, typer.Option(help="Fraction of the decoder layers' parameters to remove.")] = 0.2,
    compensate: Annotated[bool, typer.Option(
        "--compensate/--no-compensate",
        help="Fold the removed channels' or heads' mean output into a bias (FLAP); needs a config that can "
             "declare biases, such as Llama's.")] = False,
    data: Annotated[str, typer.Option(help="Calibration text: news, wiki, a text file or folder, or hf:<dataset>.")]
    = "news",
    samples: Annotated[int, typer.Option(help="Calibration sequences.")] = 64,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 512,
    device: Device = "cpu",
    trust_remote_code: TrustRemote = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """Structured pruning: remove whole feed-forward channels, head groups or decoder layers.

    Writes a smaller dense model whose config has the new shapes, so plain transformers loads it;
    the saved folder is reloaded and checked against the pruned model before it appears.
    """
    from .shrink import shrink as run_shrink

    summary = run_shrink(model, output, unit, remove, compensate, data, samples, seq_len, device=device,
                         trust_remote_code=trust_remote_code, overwrite=overwrite, progress=_progress(quiet or json_))
    if json_:
        return _print_json({k: v for k, v in summary.items() if k != "removed"})
    out.print(f"{summary['output']}: removed {summary['removed_fraction']:.1%} of the decoder layers' parameters "
              f"as whole {unit} (asked {remove:.1%}{', bias-compensated' if summary['compensate'] else ''}); "
              f"{summary['params_before'] / 1e6:.1f} M -> {summary['params_after'] / 1e6:.1f} M parameters, "
              f"{summary['decoder_layers']} layers, intermediate size {summary['intermediate_size']}, "
              f"{summary['attention_heads']} query / {summary['key_value_heads']} key-value heads; reloads in "
              f"plain transformers with the same logits ({summary['seconds']:.0f} s)", highlight=False)


Sets = Annotated[Optional[list[str]], typer.Option("--set", help="Override a key, e.g. steps.0.bits=3 (repeatable).")]


@app.command("run")
@_friendly
def run_cmd(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML file.")],
    set_: Sets = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Overrides the file's output.")] = None,
    device: Annotated[Optional[str], typer.Option(help="Overrides the file's device: " + DEVICE_HELP)] = None,
    overwrite: Overwrite = False,
    resume: Resume = False,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """Run a pipeline file: load, evaluate, compress step by step, save, evaluate."""
    from .pipeline import load_file

    sets = [*(set_ or []), *([f"device={device}"] if device else [])]
    _run_and_report(load_file(pipeline, sets), output, overwrite, resume, quiet, json_)


@app.command()
@_friendly
def validate(pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML file.")], set_: Sets = None,
             json_: Json = False) -> None:
    """Check a pipeline file without loading any model."""
    from .pipeline import load_file

    p = load_file(pipeline, set_ or [])
    if json_:
        return _print_json(p.model_dump(mode="json"))
    out.print(f"{pipeline}: valid ({len(p.steps)} step(s): {', '.join(s.method for s in p.steps)}; "
              f"model {p.model}; output {p.output or 'none'})", highlight=False)


@app.command()
@_friendly
def methods(name: Annotated[Optional[str], typer.Argument(help="Show this method's fields.")] = None,
            json_: Json = False) -> None:
    """List the registered methods, or one method's fields with help and defaults."""
    from .registry import method_config, methods as registered

    if name is None:
        rows = [{"name": n, "description": (c.__doc__ or "").strip().splitlines()[0],
                 "needs_calibration": c.needs_calibration, "version": c.version} for n, c in registered().items()]
        if json_:
            return _print_json(rows)
        t = Table(title="Methods")
        for col in ("name", "description", "calibration", "version"):
            t.add_column(col)
        for r in rows:
            t.add_row(r["name"], r["description"], "yes" if r["needs_calibration"] else "no", str(r["version"]))
        return _show(t)
    cls = method_config(name)
    fields = [{"name": f, "type": _type_name(info.annotation), "default": info.get_default(call_default_factory=True),
               "description": info.description or ""} for f, info in cls.model_fields.items() if f != "method"]
    if json_:
        return _print_json({"name": name, "description": (cls.__doc__ or "").strip(), "fields": fields})
    t = Table(title=f"{name}: {(cls.__doc__ or '').strip().splitlines()[0]}")
    for col in ("field", "type", "default", "description"):
        t.add_column(col)
    for f in fields:
        t.add_row(f["name"], f["type"], repr(f["default"]), f["description"])
    _show(t)


def _type_name(annotation: Any) -> str:
    from typing import Literal, get_args, get_origin

    if get_origin(annotation) is Literal:
        return " | ".join(repr(a) for a in get_args(annotation))
    if get_origin(annotation) is not None:
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", str(annotation))


# --- using checkpoints ---------------------------------------------------------------------
@app.command("eval")
@_friendly
def eval_cmd(
    model: Annotated[str, typer.Argument(help="Checkpoint or model (any model reference).")],
    base: Annotated[Optional[str], typer.Option(help="Uncompressed model to measure KL and top-1 against.")] = None,
    data: Annotated[str, typer.Option(help="wiki, news, a text file or folder, or hf:<dataset>.")] = "wiki",
    windows: Annotated[int, typer.Option(help="Perplexity windows.")] = 64,
    seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 512,
    speed: Annotated[bool, typer.Option("--speed/--no-speed", help="Measure prefill and decode tokens/s.")] = True,
    compile: Annotated[bool, typer.Option(
        "--compile", help="Time decoding with a static cache and a compiled step per token (CUDA graphs on CUDA), "
        "after one untimed call that compiles.")] = False,
    device: Device = "cpu",
    dtype: RunDtype = "float32",
    trust_remote_code: TrustRemote = False,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """Evaluate with the protocol of EVAL.md (perplexity; with --base, KL divergence and top-1 agreement)."""
    from pydantic import ValidationError

    from .commands import eval_model
    from .evaluate import EvalConfig
    from .pipeline import describe_error
    from .report import eval_table

    try:
        config = EvalConfig(data=data, windows=windows, seq_len=seq_len, speed=speed, compile_decode=compile)
    except ValidationError as e:
        raise CompressError(f"eval options: {describe_error(e, EvalConfig)}") from None
    evals = eval_model(model, base, config, device, trust_remote_code, _progress(quiet or json_), dtype)
    if json_:
        return _print_json([{"model": e.label, "path": str(e.path), "disk_bytes": e.disk_bytes,
                             "bits_per_weight": e.bits_per_weight, **e.result.to_dict()} for e in evals])
    _show(eval_table([(e.label, e.result, e.disk_bytes, e.bits_per_weight) for e in evals],
                     title=f"{data} on {evals[-1].result.device}"))


@app.command()
@_friendly
def info(checkpoint: Annotated[str, typer.Argument(help="Compressed checkpoint folder.")], json_: Json = False) -> None:
    """Show a checkpoint's manifest: steps, configs, versions, per-layer formats and sizes."""
    from .commands import info as read_info
    from .report import manifest_tables

    manifest = read_info(checkpoint)
    if json_:
        return _print_json(manifest)
    _show(*manifest_tables(manifest))


@app.command()
@_friendly
def generate(
    model: Annotated[str, typer.Argument(help="Checkpoint or model.")],
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 64,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    compile: Annotated[bool, typer.Option(
        "--compile", help="Decode with a static cache and a compiled step per token (CUDA graphs on CUDA): "
        "fast once compiled, which takes a while at first.")] = False,
    device: Device = "cpu",
    dtype: RunDtype = "float32",
    trust_remote_code: TrustRemote = False,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """Generate text greedily with a (compressed) model."""
    from .commands import generate as run_generate

    result = run_generate(model, prompt, max_new_tokens, chat, device, trust_remote_code, _progress(quiet or json_),
                          dtype, compile)
    if json_:
        return _print_json(result)
    out.print(result["text"], highlight=False, markup=False)
    steady = result["steady_tokens_per_s"]
    after = f", {steady:.1f} tokens/s once compiled" if steady is not None else ""
    err.print(f"[dim]{result['new_tokens']} tokens, {result['tokens_per_s']:.1f} tokens/s{after}[/]")
