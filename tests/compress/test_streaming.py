"""Streaming and resuming: the streamed checkpoint equals the in-memory one, and a run interrupted
after a layer continues to exactly the checkpoint of an uninterrupted run."""

import pytest
import torch
from safetensors.torch import load_file

import compress
from compress import checkpoint, streaming
from compress.errors import CompressError, Interrupted
from compress.loading import load_model
from compress.pipeline import parse
from compress.runner import compress_model

CAL = {"samples": 4, "seq_len": 32}


def pipeline(tiny_dir, out, **step):
    return {"model": str(tiny_dir), "calibration": CAL, "eval": None, "output": str(out),
            "steps": [{"method": "gptq", "bits": 4, "group_size": 32, **step}]}


def tensors(folder):
    out = {}
    for f in checkpoint.tensor_files(folder):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "full"
    compress.run(pipeline(tiny_dir, out))
    return out


@pytest.mark.parametrize("method", ["gptq", "awq", "rtn"])
def test_streamed_equals_in_memory(tiny_dir, tmp_path, method):
    raw = pipeline(tiny_dir, tmp_path / "streamed", method=method)
    compress.run(raw)
    model, tokenizer, _ = load_model(str(tiny_dir))
    compress_model(model, tokenizer, parse(raw))
    checkpoint.save(model, None, tmp_path / "memory", {}, False)
    streamed, memory = tensors(tmp_path / "streamed"), tensors(tmp_path / "memory")
    assert streamed.keys() == memory.keys()
    for k in memory:
        assert torch.equal(streamed[k], memory[k]), k


def test_interrupted_run_resumes_to_the_same_checkpoint(tiny_dir, tmp_path, uninterrupted, monkeypatch):
    out = tmp_path / "o"
    real = streaming.save_progress

    def interrupt_after_first_layer(staging, state, calls):
        real(staging, state, calls)
        raise KeyboardInterrupt

    monkeypatch.setattr("compress.runner.save_progress", interrupt_after_first_layer)
    with pytest.raises(Interrupted, match=r"interrupted after 1 of 2 layers; .*--resume"):
        compress.run(pipeline(tiny_dir, out))
    assert not out.exists() and (tmp_path / "o.partial" / "layer-00000.safetensors").is_file()
    monkeypatch.setattr("compress.runner.save_progress", real)

    with pytest.raises(CompressError, match=r"--resume: the pipeline differs .*steps.0.bits: 4 -> 3"):
        compress.run(pipeline(tiny_dir, out, bits=3), resume=True)

    result = compress.run(pipeline(tiny_dir, out), resume=True)
    assert [len(s.modules) for s in result.steps] == [14]  # the report covers both runs' layers
    assert not (tmp_path / "o.partial").exists()
    resumed, full = tensors(out), tensors(uninterrupted)
    assert resumed.keys() == full.keys() and all(torch.equal(resumed[k], full[k]) for k in full)
    with torch.no_grad():
        x = torch.randint(0, 320, (1, 16))
        assert torch.equal(compress.load(out)(x).logits, compress.load(uninterrupted)(x).logits)


def test_resume_without_an_interrupted_run(tiny_dir, tmp_path):
    with pytest.raises(CompressError, match=r"--resume: there is no interrupted run to continue"):
        compress.run(pipeline(tiny_dir, tmp_path / "o"), resume=True)
