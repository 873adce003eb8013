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


def pipeline(tiny_dir, out, offload="cpu", **step):
    return {"model": str(tiny_dir), "calibration": {**CAL, "offload": offload}, "eval": None, "output": str(out),
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


@pytest.mark.parametrize("method, offload", [("gptq", "cpu"), ("awq", "cpu"), ("rtn", "cpu"), ("gptq", "disk")])
def test_streamed_equals_in_memory(tiny_dir, tmp_path, method, offload):
    raw = pipeline(tiny_dir, tmp_path / "streamed", offload, method=method)
    compress.run(raw)
    model, tokenizer, _ = load_model(str(tiny_dir))
    compress_model(model, tokenizer, parse(raw))
    checkpoint.save(model, None, tmp_path / "memory", {}, False)
    streamed, memory = tensors(tmp_path / "streamed"), tensors(tmp_path / "memory")
    assert streamed.keys() == memory.keys()
    for k in memory:
        assert torch.equal(streamed[k], memory[k]), k


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_interrupted_run_resumes_to_the_same_checkpoint(tiny_dir, tmp_path, uninterrupted, monkeypatch, offload):
    out = tmp_path / "o"
    real = streaming.save_progress

    def interrupt_after_first_layer(staging, state, calls):
        state["seconds"] = {"0": 1000.0}  # marks the interrupted run's time, which the report must carry
        real(staging, state, calls)
        raise KeyboardInterrupt

    monkeypatch.setattr("compress.runner.save_progress", interrupt_after_first_layer)
    with pytest.raises(Interrupted, match=r"interrupted after 1 of 2 layers; .*--resume"):
        compress.run(pipeline(tiny_dir, out, offload))
    assert not out.exists() and (tmp_path / "o.partial" / "layer-00000.safetensors").is_file()
    if offload == "disk":  # layer 1's inputs wait in the second slot, one file per sample
        assert len(list((tmp_path / "o.partial" / "activations" / "1").glob("sample-*.safetensors"))) == CAL["samples"]
    monkeypatch.setattr("compress.runner.save_progress", real)

    with pytest.raises(CompressError, match=r"--resume: the pipeline differs .*steps.0.bits: 4 -> 3"):
        compress.run(pipeline(tiny_dir, out, offload, bits=3), resume=True)

    result = compress.run(pipeline(tiny_dir, out, offload), resume=True)
    assert [len(s.modules) for s in result.steps] == [14]  # the report covers both runs' layers
    assert 1000.0 < result.steps[0].seconds < 1100.0
    assert not (tmp_path / "o.partial").exists()
    resumed, full = tensors(out), tensors(uninterrupted)
    assert resumed.keys() == full.keys() and all(torch.equal(resumed[k], full[k]) for k in full)
    with torch.no_grad():
        x = torch.randint(0, 320, (1, 16))
        assert torch.equal(compress.load(out)(x).logits, compress.load(uninterrupted)(x).logits)


def test_resume_without_an_interrupted_run(tiny_dir, tmp_path):
    with pytest.raises(CompressError, match=r"--resume: there is no interrupted run to continue"):
        compress.run(pipeline(tiny_dir, tmp_path / "o"), resume=True)


def test_out_of_memory_names_the_settings_and_keeps_the_finished_layers(tiny_dir, tmp_path, monkeypatch):
    from compress.quant.gptq import GPTQCompressor

    real = GPTQCompressor.compress

    def fail_in_second_layer(self, name, module):
        if name.startswith("model.layers.1."):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, name, module)

    monkeypatch.setattr(GPTQCompressor, "compress", fail_in_second_layer)
    with pytest.raises(CompressError, match=r"out of memory on cpu in model.layers.1 \(CUDA out of memory.*\): lower "
                       r"calibration.batch_size \(8\), samples \(4\) or seq_len \(32\), or set calibration.offload: "
                       r"disk .*add --resume to continue"):
        compress.run(pipeline(tiny_dir, tmp_path / "o"))
    assert (tmp_path / "o.partial" / "layer-00000.safetensors").is_file()
