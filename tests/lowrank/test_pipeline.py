"""Low-rank steps in pipelines on the tiny model: budgets met and reported, factors quantized by
a later step, dense-kept layers, fixed ranks, and the bad inputs of the CLI."""

import json

import pytest
import torch
from typer.testing import CliRunner

import compress
from compress import checkpoint
from compress.cli import app
from compress.lowrank.layers import LowRankLinear
from compress.quant.layers import QuantLinear

CALIBRATION = {"samples": 4, "seq_len": 32}
X = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(2))
runner = CliRunner()


def targeted_weights(result) -> tuple[int, int]:
    """(weights the step's modules stand for, weights their factors keep)."""
    mods = result.steps[0].modules
    return sum(m.weights for m in mods), sum(m.bytes_after // 4 for m in mods)


@pytest.mark.parametrize("allocation", ["uniform", "energy", "sensitivity"])
def test_budget_is_met_within_one_rank_step_per_layer(tiny_dir, allocation):
    r = compress.run({"model": str(tiny_dir), "eval": None, "calibration": CALIBRATION,
                      "steps": [{"method": "svd_llm", "keep": 0.4, "allocation": allocation}]})
    # 14 targeted Linear layers of 2048-6144 weights; modules kept dense are not in the report
    dense = 14 - len(r.steps[0].modules)
    weights, kept = targeted_weights(r)
    total = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 96 * 64 * 3)  # both layers' Linear weights
    kept_all = kept + (total - weights)  # dense-kept layers keep all their weights
    assert 0.4 * total - 14 * 160 <= kept_all <= 0.4 * total
    assert dense < 4  # measured: 0 (uniform, energy), 2 (sensitivity)


def test_factors_are_quantized_by_a_later_step_and_reload_identically(tiny_dir, tmp_path):
    steps = [{"method": "svd_llm", "keep": 0.5},
             {"method": "gptq", "bits": 4, "group_size": 8, "targets": ["Linear"]}]
    r = compress.run({"model": str(tiny_dir), "eval": None, "calibration": CALIBRATION, "steps": steps,
                      "output": str(tmp_path / "out")})
    lowrank, gptq = r.steps
    assert len(lowrank.modules) == 14 and len(gptq.modules) == 28
    assert {m.name.rsplit(".", 1)[1] for m in gptq.modules} == {"down", "up"}
    model = compress.load(tmp_path / "out")
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q, LowRankLinear) and isinstance(q.down, QuantLinear) and isinstance(q.up, QuantLinear)
    # the outer module accounts for its quantized factors: about a quarter of the factors' float bytes
    assert q.storage_bytes() < 0.2 * q.rank * (64 + 64) * 4
    assert r.size.compressed_modules == 14
    manifest = checkpoint.read_manifest(tmp_path / "out")
    assert manifest["modules"]["model.layers.0.self_attn.q_proj"]["spec"]["rank"] == q.rank
    with torch.no_grad():
        again = compress.load(tmp_path / "out")
        assert torch.equal(again(X).logits, model(X).logits)


def test_layers_kept_dense_by_the_plan_go_to_the_next_step(tiny_dir):
    """A fixed rank at or above a layer's break-even rank keeps it dense; a later step that targets
    the factors quantizes the whole layer instead."""
    steps = [{"method": "svd", "rank": 24}, {"method": "rtn", "bits": 8, "group_size": 8}]
    r = compress.run({"model": str(tiny_dir), "eval": None, "steps": steps})
    lowrank, rtn = r.steps
    # k/v_proj (64 -> 32) break even at rank 22: they stay dense and are quantized whole
    assert sorted({m.name.rsplit(".", 1)[1] for m in lowrank.modules}) == ["down_proj", "gate_proj", "o_proj",
                                                                          "q_proj", "up_proj"]
    whole = {m.name.rsplit(".", 1)[1] for m in rtn.modules if not m.name.endswith(("down", "up"))}
    assert whole == {"k_proj", "v_proj"}


def test_cli_lowrank_json(tiny_dir, tmp_path):
    out = tmp_path / "lr"
    res = runner.invoke(app, ["lowrank", str(tiny_dir), "-o", str(out), "--method", "svd", "--keep", "0.5",
                              "--quiet", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    step = data["steps"][0]
    assert step["method"] == "svd" and step["modules"] == 14
    assert 0.45 < step["bytes_after"] / step["bytes_before"] <= 0.5


@pytest.mark.parametrize("args, message", [
    (["--method", "gptq"], "'gptq' is not a low-rank method; use one of asvd, svd, svd_llm"),
    (["--keep", "1.5"], "keep"),
    (["--rank", "40"], "rank 40 is above min(in, out) = 32 of model.layers.0.self_attn.k_proj"),
    (["--rank", "8", "--keep", "0.5"], "rank fixes every layer's rank; keep would not apply"),
    (["--keep", "0.1", "--scope", "model"], "cannot be met: the untargeted parameters alone"),
    (["--allocation", "best"], "allocation"),
])
def test_cli_bad_input_is_one_line(tiny_dir, tmp_path, args, message):
    method = [] if "--method" in args else ["--method", "svd"]  # data-free: the tiny model's 256 positions
    res = runner.invoke(app, ["lowrank", str(tiny_dir), "-o", str(tmp_path / "x"), *method, *args])
    assert res.exit_code == 1, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_factor_shapes_are_checked_once_ranks_are_planned_before_compressing(tiny_dir, tmp_path):
    """A later step that cannot take the planned factors fails before any layer is compressed."""
    res = runner.invoke(app, ["run", str(write_pipeline(tmp_path, tiny_dir, [
        {"method": "svd", "rank": 4}, {"method": "rtn", "bits": 4, "group_size": 8}]))])
    assert res.exit_code == 1
    assert "group size 8 cannot apply to model.layers.0.self_attn.q_proj.up (Linear 4 -> 64)" in res.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_a_planning_step_cannot_take_an_earlier_steps_factors(tiny_dir, tmp_path):
    res = runner.invoke(app, ["run", str(write_pipeline(tmp_path, tiny_dir, [
        {"method": "svd", "rank": 4}, {"method": "asvd", "rank": 2}]))])
    assert res.exit_code == 1
    assert "steps[1] (asvd): plans across its modules, so it cannot take modules inside an earlier step's output" \
        in res.output


def write_pipeline(tmp_path, tiny_dir, steps):
    import yaml

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"model": str(tiny_dir), "steps": steps, "eval": None,
                                    "output": str(tmp_path / "o")}))
    return path


SURVEYED = [{"method": "svd_llm", "keep": 0.5, "allocation": "sensitivity"},
            {"method": "gptq", "bits": 4, "group_size": -1}]  # per channel: any rank the allocation picks


def raw_pipeline(tiny_dir, out, steps=SURVEYED):
    return {"model": str(tiny_dir), "calibration": CALIBRATION, "eval": None, "output": str(out), "steps": steps}


def tensors(folder):
    from safetensors.torch import load_file

    return {k: v for f in checkpoint.tensor_files(folder) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def surveyed(tiny_dir, tmp_path_factory):
    """(checkpoint folder, modules per step) of an uninterrupted run."""
    out = tmp_path_factory.mktemp("lowrank") / "full"
    result = compress.run(raw_pipeline(tiny_dir, out))
    return out, [len(s.modules) for s in result.steps]


@pytest.mark.parametrize("steps", [SURVEYED, [{"method": "svd", "keep": 0.5, "allocation": "energy"}],
                                   [{"method": "svd", "keep": 0.5, "allocation": "sensitivity"}]],
                         ids=["sensitivity+gptq", "energy-data-free", "data-free-with-calibrated-survey"])
def test_streamed_equals_in_memory(tiny_dir, tmp_path, surveyed, steps):
    from compress.loading import load_model
    from compress.pipeline import parse
    from compress.runner import compress_model

    raw = raw_pipeline(tiny_dir, tmp_path / "streamed", steps)
    streamed_folder = surveyed[0] if steps is SURVEYED else tmp_path / "streamed"
    if steps is not SURVEYED:
        compress.run(raw)
    model, tokenizer, _ = load_model(str(tiny_dir))
    compress_model(model, tokenizer, parse(raw))
    checkpoint.save(model, None, tmp_path / "memory", {}, False)
    streamed, memory = tensors(streamed_folder), tensors(tmp_path / "memory")
    assert streamed.keys() == memory.keys()
    assert all(torch.equal(streamed[k], memory[k]) for k in memory)


def test_interrupted_run_resumes_with_the_ranks_it_allocated(tiny_dir, tmp_path, surveyed, monkeypatch):
    from compress import streaming
    from compress.errors import Interrupted

    real = streaming.save_progress

    def interrupt_after_first_layer(staging, state, calls):
        real(staging, state, calls)  # also called once right after planning (layers_done 0)
        if state["layers_done"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr("compress.runner.save_progress", interrupt_after_first_layer)
    with pytest.raises(Interrupted, match="interrupted after 1 of 2 layers"):
        compress.run(raw_pipeline(tiny_dir, tmp_path / "o"))
    recorded = json.loads((tmp_path / "o.partial" / "progress.json").read_text())["plans"]["0"]
    assert len(recorded) == 14 and all(r is None or r >= 1 for r in recorded.values())
    monkeypatch.setattr("compress.runner.save_progress", real)
    monkeypatch.setattr("compress.planning.survey_layers", lambda *a, **k: pytest.fail("surveyed again on resume"))
    result = compress.run(raw_pipeline(tiny_dir, tmp_path / "o"), resume=True)
    assert [len(s.modules) for s in result.steps] == surveyed[1]
    resumed, full = tensors(tmp_path / "o"), tensors(surveyed[0])
    assert resumed.keys() == full.keys() and all(torch.equal(resumed[k], full[k]) for k in full)
