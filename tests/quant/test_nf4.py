"""NF4 / FP4 through bitsandbytes: the module holds bnb's own tensors, so its weight is bnb's,
bit for bit; the format rebuilds from its spec; error and size bounds are measured with margin."""

import sys

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from compress.errors import CompressError
from compress.quant.nf4 import NF4Config, NF4Linear

bnbf = pytest.importorskip("bitsandbytes.functional")

SETTINGS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


def quantize(linear, quant_type="nf4", double_quant=True, block_size=64, name="l"):
    config = NF4Config(quant_type=quant_type, double_quant=double_quant, block_size=block_size)
    return config.build().compress(name, linear)


def gaussian_linear(out, n, bias=False, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(n, out, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
    return lin


def rel_error(q, lin):
    w = lin.weight.detach().float()
    return ((q.dequantized_weight() - w).norm() / w.norm()).item()


@pytest.mark.parametrize("quant_type,double_quant", SETTINGS)
def test_weight_is_bitsandbytes_own_dequantization(quant_type, double_quant):
    lin = gaussian_linear(96, 64)
    q = quantize(lin, quant_type, double_quant)
    packed, state = bnbf.quantize_4bit(lin.weight.detach(), blocksize=64, quant_type=quant_type,
                                       compress_statistics=double_quant, quant_storage=torch.uint8)
    assert torch.equal(q.weight_packed, packed)
    assert torch.equal(q.dequantized_weight(), bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("double_quant", [True, False])
def test_format_semantics_by_hand_with_a_short_last_block(double_quant):
    # 9 x 10 = 90 weights in blocks of 32: 32, 32 and a short 26; blocks span rows.
    lin = gaussian_linear(9, 10)
    q = quantize(lin, "nf4", double_quant, block_size=32)
    assert q.weight_packed.shape == (45, 1) and q.absmax.shape == (3,)
    packed = q.weight_packed.flatten()
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).flatten().long()  # high nibble first
    if double_quant:  # 8-bit codes of (absmax - mean) on the dynamic map, one scale per 256 blocks
        blocks = torch.arange(3)
        absmax = q.nested_quant_map[q.absmax.long()] * q.nested_absmax[blocks // 256] + q.nested_offset
    else:
        absmax = q.absmax
    w = q.quant_map[codes] * absmax[torch.arange(90) // 32]
    assert torch.equal(q.dequantized_weight(), w.reshape(9, 10))


def test_odd_input_size_is_handled_like_bitsandbytes():
    # 5 x 7 = 35 weights: one short block, an odd number of 4-bit codes (the last byte half used).
    # bnb's CPU path falls back to a torch.compile'd kernel here (seconds, once per shape).
    lin = gaussian_linear(5, 7)
    q = quantize(lin)
    packed, state = bnbf.quantize_4bit(lin.weight.detach(), blocksize=64, quant_type="nf4", compress_statistics=True)
    assert q.weight_packed.shape == (18, 1)
    assert torch.equal(q.dequantized_weight(), bnbf.dequantize_4bit(packed, state))
    empty = NF4Linear.from_spec(q.format_spec(), device="meta")
    assert {k: (v.shape, v.dtype) for k, v in empty.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in q.state_dict().items()}


def test_gaussian_error_nf4_beats_fp4_and_double_quant_barely_matters():
    lin = gaussian_linear(256, 512)
    err = {(t, dq): rel_error(quantize(lin, t, dq), lin) for t, dq in SETTINGS}
    assert err["nf4", True] < 0.10  # measured 0.092 (block 64)
    assert err["fp4", True] < 0.135  # measured 0.122
    assert err["nf4", True] < 0.8 * err["fp4", True]  # measured ratio 0.75
    for t in ("nf4", "fp4"):
        assert abs(err[t, True] - err[t, False]) < 1e-3  # measured ~2e-5
    assert rel_error(quantize(lin, block_size=256), lin) > err["nf4", True]  # coarser blocks, more error


def test_double_quant_cuts_storage():
    lin = gaussian_linear(1536, 576)  # SmolLM2's gate_proj shape: n = 884736 weights, 13824 blocks of 64
    dq, plain = quantize(lin, double_quant=True), quantize(lin, double_quant=False)
    n = 884736
    # codes n/2 + uint8 absmax n/64 + float32 nested absmax per 256 blocks + maps (16 + 256 floats) + offset
    assert dq.storage_bytes() == n // 2 + n // 64 + 4 * 54 + 4 * (16 + 256) + 4
    # codes n/2 + float32 absmax per 64 + the 16-float map
    assert plain.storage_bytes() == n // 2 + 4 * n // 64 + 4 * 16
    assert dq.storage_bytes() * 8 / n == pytest.approx(4.1368, abs=1e-4)  # asymptotically 4.127
    assert plain.storage_bytes() * 8 / n == pytest.approx(4.5006, abs=1e-4)
    assert dq.num_weights() == plain.num_weights() == n


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_from_spec_rebuilds_empty_module_with_same_state_layout(double_quant, bias):
    q = quantize(gaussian_linear(48, 64, bias=bias, dtype=torch.bfloat16), "fp4", double_quant, block_size=128)
    empty = NF4Linear.from_spec(q.format_spec(), device="meta")
    assert all(t.is_meta for t in empty.state_dict().values())
    assert {k: (v.shape, v.dtype) for k, v in empty.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in q.state_dict().items()}
    assert empty.format_spec() == q.format_spec()


@pytest.mark.parametrize("quant_type,double_quant", SETTINGS)
def test_safetensors_round_trip_is_bit_identical(quant_type, double_quant, tmp_path):
    q = quantize(gaussian_linear(96, 64, bias=True), quant_type, double_quant)
    save_file(q.state_dict(), str(tmp_path / "m.safetensors"))
    loaded = NF4Linear.from_spec(q.format_spec(), device="meta")
    loaded.load_state_dict(load_file(str(tmp_path / "m.safetensors")), assign=True)
    x = torch.randn(4, 64)
    assert torch.equal(loaded(x), q(x))
    assert all(torch.equal(v, q.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_input_linear_is_not_modified_and_forward_is_dequantize_then_matmul():
    lin = gaussian_linear(96, 64, bias=True)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    q = quantize(lin)
    assert all(torch.equal(v, before[k]) for k, v in lin.state_dict().items())
    x = torch.randn(3, 64)
    ref = nn.functional.linear(x, q.dequantized_weight(), lin.bias)
    auto = q(x)  # on CPU the C++ kernels (tests/cuda/test_cpu_nf4.py): the same weight, sums in another order
    assert ((auto - ref).norm() / ref.norm()).item() < 1e-6
    q.kernel = "reference"
    assert torch.equal(q(x), ref)
    assert torch.equal(q.bias, lin.bias)


def test_bf16_activations_and_weights():
    q = quantize(gaussian_linear(96, 64, bias=True))
    x = torch.randn(2, 64)
    y = q(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), q(x), atol=0.01, rtol=0.02)  # measured max diff 0.0018 on outputs ~0.4
    lin16 = gaussian_linear(96, 64, bias=True, dtype=torch.bfloat16)
    q16 = quantize(lin16)
    assert q16.format_spec()["weight_dtype"] == "bfloat16" and q16.bias.dtype == torch.bfloat16
    assert q16.dequantized_weight(torch.bfloat16).dtype == torch.bfloat16
    assert rel_error(q16, lin16) < 0.10  # measured 0.092, as in float32


def test_describe_and_repr():
    lin = gaussian_linear(8, 64)
    assert quantize(lin).describe() == "nf4 b64 dq"
    assert quantize(lin, "fp4", False, 128).describe() == "fp4 b128"
    assert "in_features=64, out_features=8, nf4 b64 dq" in repr(quantize(lin))


def test_bad_config_values_are_refused():
    for bad in ({"block_size": 48}, {"quant_type": "int4"}, {"bits": 4}, {"double_quant": "maybe"}):
        with pytest.raises(ValidationError):
            NF4Config(**bad)
    assert all(f.description for name, f in NF4Config.model_fields.items() if name != "method")
    assert NF4Config().model_dump()["block_size"] == 64 and not NF4Config.needs_calibration


def test_missing_bitsandbytes_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(CompressError, match="pip install bitsandbytes"):
        quantize(gaussian_linear(8, 64))


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_bnb_linear4bit_computes_the_same(quant_type, double_quant):
    lin = gaussian_linear(96, 64, bias=True)
    q = quantize(lin, quant_type, double_quant)
    x = torch.randn(3, 64)
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            # Linear4bit fixes its compute dtype at its first forward and, on AVX512-BF16 CPUs,
            # repacks with bf16 scales in eval mode: a fresh one, with that repacking off, is exact.
            l4 = q.to_bnb_linear4bit()
            l4.support_avx512bf16_for_cpu = False
            expected = l4(x.to(dtype))
            q.kernel = "reference"
            assert torch.equal(expected, q(x.to(dtype)))
            q.kernel = "auto"  # the C++ kernels: bf16 exactly too, fp32 with the sums in another order
            assert ((q(x.to(dtype)).float() - expected.float()).norm() / expected.float().norm()).item() < 1e-6
    assert q.bias.dtype == torch.float32  # Linear4bit casts its own bias in place, not ours
    state = l4.state_dict()  # bitsandbytes' (and Transformers') serialization of the same tensors
    assert torch.equal(state["weight"], q.weight_packed) and torch.equal(state["weight.absmax"], q.absmax)
    if double_quant:
        assert torch.equal(state["weight.nested_absmax"], q.nested_absmax)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-3), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("rows", [1, 64])  # gemv kernel, and the dequantize + matmul fallback
def test_cuda_matmul_4bit_matches_reference(dtype, bound, rows):
    # Bounds not measured (no GPU in the session that wrote this): both paths use the same
    # dequantized weight; the difference is the accumulation and rounding of the output.
    q = quantize(gaussian_linear(256, 512, bias=True)).cuda()
    x = torch.randn(rows, 512, device="cuda", dtype=dtype)
    with torch.no_grad():
        fast = q(x)
        q.kernel = "reference"
        ref = q(x)
    assert fast.dtype == dtype
    assert ((fast.float() - ref.float()).norm() / ref.float().norm()).item() < bound
