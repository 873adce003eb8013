"""The CLI through Typer's runner: the happy paths on the tiny model, and every bad input of the
spine issue giving one line, a non-zero exit and nothing written."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from compress.cli import app

runner = CliRunner()
G32 = ["--group-size", "32"]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def assert_one_line_error(result, pattern):
    import re

    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture(scope="module")
def ckpt(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "int4"
    r = cli("quantize", tiny_dir, "-o", out, "--bits", "4", *G32, "--quiet")
    assert r.exit_code == 0, r.output
    return out


def test_quantize_writes_checkpoint_and_reports(ckpt):
    assert (ckpt / "compress.json").is_file() and (ckpt / "model.safetensors.index.json").is_file()
    # one tensor file per decoder layer (written as each finished) plus the rest; no staging left
    assert sorted(p.name for p in ckpt.glob("*.safetensors")) == [
        "layer-00000.safetensors", "layer-00001.safetensors", "rest.safetensors"]
    assert not ckpt.with_name("int4.partial").exists()
    assert (ckpt / "tokenizer.json").is_file() and (ckpt / "config.json").is_file()


def test_quantize_json(tiny_dir, tmp_path):
    r = cli("quantize", tiny_dir, "-o", tmp_path / "o", "--bits", "3", *G32, "--asymmetric", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["steps"][0]["formats"] == ["int3 g32 asym"] and data["steps"][0]["modules"] == 14


def test_info(ckpt):
    r = cli("info", ckpt, "--json")
    assert r.exit_code == 0
    manifest = json.loads(r.stdout)
    assert manifest["steps"][0]["config"]["bits"] == 4 and len(manifest["modules"]) == 14
    r = cli("info", ckpt)
    assert "model.layers.1.mlp.down_proj" in r.stdout and "int4 g32 sym" in r.stdout


def test_eval_against_base(ckpt, tiny_dir):
    r = cli("eval", ckpt, "--base", tiny_dir, "--windows", 2, "--seq-len", 32, "--no-speed", "--json")
    assert r.exit_code == 0, r.output
    base, model = json.loads(r.stdout)
    assert base["kl"] is None and model["kl"] > 0 and model["bits_per_weight"] == pytest.approx(4.5)
    assert model["disk_bytes"] < base["disk_bytes"]


def test_eval_table(ckpt):
    r = cli("eval", ckpt, "--windows", 2, "--seq-len", 32, "--no-speed", "--quiet")
    assert r.exit_code == 0 and "perplexity" in r.stdout


def test_generate(ckpt):
    r = cli("generate", ckpt, "The fire", "--max-new-tokens", 5, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["new_tokens"] == 5


def test_eval_in_bfloat16_runs_packed_cpu_kernels(ckpt, tiny_dir):
    import torch

    from compress.loading import load_model
    from compress.quant.layers import QuantLinear

    model = load_model(str(ckpt), "bfloat16")[0]
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quant) == 14 and all(m._cpu_packed is not None for m in quant)  # int4 g32: PyTorch's packed matmul
    assert all(m.scales.dtype == torch.float16 for m in quant)  # storage untouched by the cast
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    runs = {}
    for dtype in ("float32", "bfloat16"):
        r = cli("eval", ckpt, "--base", tiny_dir, "--windows", 2, "--seq-len", 32, "--no-speed", "--json",
                "--dtype", dtype)
        assert r.exit_code == 0, r.output
        runs[dtype] = json.loads(r.stdout)[1]
    # measured 6e-5 apart (322.65 vs 322.63): bf16 activations and the packed kernel change little
    assert runs["bfloat16"]["perplexity"] == pytest.approx(runs["float32"]["perplexity"], rel=1e-3)
    assert_one_line_error(cli("generate", ckpt, "x", "--dtype", "int8"), "unknown dtype 'int8'")


def test_methods():
    r = cli("methods")
    assert r.exit_code == 0 and "rtn" in r.stdout
    r = cli("methods", "rtn", "--json")
    fields = {f["name"]: f for f in json.loads(r.stdout)["fields"]}
    assert fields["bits"]["default"] == 4 and "2 to 8" in fields["bits"]["description"]
    assert_one_line_error(cli("methods", "gptqq"), "unknown method 'gptqq'")


def write_pipeline(tmp_path, tiny_dir, **extra):
    import yaml

    raw = {"model": str(tiny_dir), "steps": [{"method": "rtn", "bits": 4, "group_size": 32}],
           "eval": {"windows": 2, "seq_len": 32, "fidelity_windows": 1, "speed": False}, **extra}
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(raw))
    return f


def test_run_with_overrides(tmp_path, tiny_dir):
    f = write_pipeline(tmp_path, tiny_dir)
    r = cli("run", f, "--set", "steps.0.bits=3", "-o", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["steps"][0]["formats"] == ["int3 g32 sym"] and data["compressed"]["kl"] > 0
    assert (tmp_path / "o" / "compress.json").is_file()


def test_run_table(tmp_path, tiny_dir):
    r = cli("run", write_pipeline(tmp_path, tiny_dir), "--quiet")
    assert r.exit_code == 0, r.output
    assert "KL vs base" in r.stdout and "nothing was written" in r.stdout


def test_validate(tmp_path, tiny_dir):
    r = cli("validate", write_pipeline(tmp_path, tiny_dir))
    assert r.exit_code == 0 and "valid" in r.stdout


def test_models_list():
    r = cli("models", "list", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["name"] == "smollm2-135m"


# --- bad input: one line, non-zero exit, nothing written ----------------------------------------
def assert_nothing_written(folder):
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize(
    "model, pattern",
    [
        ("/no/such/model", "model path /no/such/model does not exist"),
        ("./missing-folder", "model path ./missing-folder does not exist"),
        ("llama-7b", "unknown model 'llama-7b': not a prepared name"),
        ("compress-tests/no-such-model", "cannot download 'compress-tests/no-such-model'|does not exist on the"),
    ],
)
def test_bad_model_arguments(tmp_path, model, pattern):
    out = tmp_path / "out"
    assert_one_line_error(cli("quantize", model, "-o", out), pattern)
    assert_nothing_written(tmp_path)


def test_folder_without_model(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(cli("quantize", tmp_path / "empty", "-o", tmp_path / "o"), "has no config.json")


def test_pickle_checkpoint_refused_unless_opted_in(tiny_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    src = tmp_path / "pickled"
    shutil.copytree(tiny_dir, src)
    state = AutoModelForCausalLM.from_pretrained(src).state_dict()
    (src / "model.safetensors").unlink()
    torch.save(state, src / "pytorch_model.bin")
    assert_one_line_error(cli("quantize", src, "-o", tmp_path / "o", *G32), r"only pickle weights .* --allow-pickle")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--method", "rtm"], r"steps\[0\]\.method: unknown method 'rtm'.*did you mean 'rtn'"),
        (["--bits", "9"], r"steps\[0\]\.bits: Input should be less than or equal to 8 \(got 9\)"),
        (["--bits", "1"], r"steps\[0\]\.bits: Input should be greater than or equal to 2"),
        (["--group-size", "128"], r"group size 128 cannot apply to model.layers.0.self_attn.q_proj \(Linear 64 -> 64\)"),
        (["--group-size", "3"], r"group_size: .*-1 \(per-channel\) or at least 8"),
        (["--targets", "gate_prj"], "target 'gate_prj' matches no module"),
        (["--method", "fp8", "--bits", "4"], r"steps\[0\]\.bits: unknown key \(valid keys: method, targets, ignore, "
                                             r"scale_dtype\)"),
        (["--offload", "gpu"], r"calibration.offload: Input should be 'cpu' or 'disk' \(got 'gpu'\)"),
    ],
)
def test_bad_quantize_settings(tiny_dir, tmp_path, extra, pattern):
    out = tmp_path / "out"
    assert_one_line_error(cli("quantize", tiny_dir, "-o", out, *extra), pattern)
    assert_nothing_written(tmp_path)


def test_bad_pipeline_files(tmp_path, tiny_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nsteps:\n  - method: rtn\n   bits: 3\n")
    assert_one_line_error(cli("run", bad), r"bad.yaml:4:4: malformed YAML")
    assert_one_line_error(cli("validate", bad), r"bad.yaml:4:4: malformed YAML")
    f = write_pipeline(tmp_path, tiny_dir)
    assert_one_line_error(cli("run", f, "--set", "steps.0.bitz=3"), r"steps\[0\]\.bitz: unknown key .*did you mean 'bits'")
    assert_one_line_error(cli("run", tmp_path / "nope.yaml"), "pipeline file .*nope.yaml does not exist")
    assert_one_line_error(cli("run", f, "--device", "gpu"), r"device: String should match pattern .*\(got 'gpu'\)")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda(tmp_path, tiny_dir):
    result = cli("run", write_pipeline(tmp_path, tiny_dir), "--device", "cuda")
    assert_one_line_error(result, r"device 'cuda' requested but no CUDA device is available; use --device cpu")


def test_existing_output_refused_before_work(ckpt, tiny_dir):
    before = (ckpt / "rest.safetensors").read_bytes()
    assert_one_line_error(cli("quantize", tiny_dir, "-o", ckpt, *G32), r"already exists; choose another path or pass --overwrite")
    assert (ckpt / "rest.safetensors").read_bytes() == before


def test_overwrite_replaces(tiny_dir, tmp_path):
    out = tmp_path / "o"
    assert cli("quantize", tiny_dir, "-o", out, "--bits", "8", *G32, "-q").exit_code == 0
    assert cli("quantize", tiny_dir, "-o", out, "--bits", "2", *G32, "-q", "--overwrite").exit_code == 0
    assert json.loads((out / "compress.json").read_text())["steps"][0]["config"]["bits"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no staging or temporary folders left


def test_unwritable_output(tiny_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_one_line_error(cli("quantize", tiny_dir, "-o", blocker / "out", *G32), r"cannot write output folder .*file/out")
    assert_one_line_error(cli("quantize", tiny_dir, "-o", "/proc/compress-out", *G32), r"output folder|cannot write")


@pytest.mark.parametrize("damage, pattern", [
    ("truncate", r"layer-00001.safetensors is truncated or corrupt"),
    ("delete", r"missing tensor file layer-00001.safetensors"),
    ("version", r"manifest version 7; this compress reads version 1"),
])
def test_damaged_checkpoints(ckpt, tmp_path, damage, pattern):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    f = bad / "layer-00001.safetensors"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:1000])
    elif damage == "delete":
        f.unlink()
    else:
        m = json.loads((bad / "compress.json").read_text())
        (bad / "compress.json").write_text(json.dumps({**m, "version": 7}))
    for cmd in (["eval", bad, "--windows", 1, "--no-speed"], ["generate", bad, "hi"]):
        assert_one_line_error(cli(*cmd), pattern)


def test_prune_writes_a_verified_sparse_checkpoint(tiny_dir, tmp_path):
    r = cli("prune", tiny_dir, "-o", tmp_path / "p", "--method", "magnitude", "--pattern", "2:4", "--json")
    assert r.exit_code == 0, r.output
    step = json.loads(r.stdout)["steps"][0]
    assert step["formats"] == ["2:4 sparse (50.0%)"] and step["modules"] == 14
    manifest = json.loads(cli("info", tmp_path / "p", "--json").stdout)
    assert {m["spec"]["pattern"] for m in manifest["modules"].values()} == {"2:4"}


def test_prune_with_bits_stores_kept_codes_that_reload(tiny_dir, tmp_path):
    r = cli("prune", tiny_dir, "-o", tmp_path / "p", "--pattern", "2:4", "--bits", "4", "--group-size", "32",
            "--samples", "4", "--seq-len", "64", "--json")
    assert r.exit_code == 0, r.output
    step = json.loads(r.stdout)["steps"][0]
    assert step["formats"] == ["2:4 sparse (50.0%) + int4 g32 sym"] and step["modules"] == 14
    manifest = json.loads(cli("info", tmp_path / "p", "--json").stdout)
    specs = [m["spec"] for m in manifest["modules"].values()]
    assert {(s["pattern"], s["bits"], s["storage"]) for s in specs} == {("2:4", 4, "nm")}
    # 4-bit kept codes, 2-bit positions and a float16 scale per 32 columns: 3.5 bits per weight
    assert all(m["bytes"] * 8 == m["weights"] * 3.5 for m in manifest["modules"].values())
    r = cli("eval", tmp_path / "p", "--windows", 1, "--no-speed", "--json")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("args,pattern", [
    (["--pattern", "3:7"], r"pattern 3:7 cannot apply to model\.layers\.0\.self_attn\.q_proj \(Linear 64 -> 64\): "
                           r"its input dimension is not a multiple of 7"),
    (["--sparsity", "1.0"], r"sparsity: .*less than 1"),
    (["--pattern", "2:4", "--sparsity", "0.3"], r"pattern 2:4 prunes 50\.00%; sparsity 0\.3 contradicts it"),
    (["--pattern", "1:1"], r"pattern must be 'unstructured' or 'N:M'"),
    (["--method", "gptq"], r"'gptq' is not a pruning method; use one of magnitude, sparsegpt, wanda"),
    (["--method", "wanda", "--bits", "4"], r"'wanda' does not quantize the kept weights \(--bits\); use sparsegpt"),
    (["--group-size", "64"], r"add --bits to quantize them"),
    (["--method", "sparsegpt", "--bits", "4", "--group-size", "48"], r"quantize.group_size 48 and block_size 128"),
    (["--method", "sparsegpt", "--bits", "4", "--group-size", "128"],
     r"group size 128 cannot apply to model\.layers\.0\.self_attn\.q_proj \(Linear 64 -> 64\)"),
])
def test_prune_bad_input_is_one_line_and_writes_nothing(tiny_dir, tmp_path, args, pattern):
    method = [] if "--method" in args else ["--method", "magnitude"]
    assert_one_line_error(cli("prune", tiny_dir, "-o", tmp_path / "p", *method, *args), pattern)
    assert not list(tmp_path.iterdir())
