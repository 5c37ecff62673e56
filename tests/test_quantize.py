"""Weight-only int8/int4 quantization: formats, official-checkpoint compatibility, the layer's
dispatch and the CPU kernels against their dequantize-and-matmul reference."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from localglm.convert import quantize_stream
from localglm.quantize import (
    INT4_GROUP_SIZES,
    QUANTIZED_LINEAR_NAMES,
    QuantizedLinear,
    cpu_kernels,
    dequantize_int4_grouped,
    dequantize_int4_official,
    dequantize_int8,
    make_quantized_skeleton,
    pack_int4_official,
    quantize_int4_grouped,
    quantize_int4_official,
    quantize_int8_official,
    quantize_int8_rowwise,
    unpack_int4_grouped,
    unpack_int4_official,
)

DATA = Path(__file__).parent / "data"
BF16_U = 2.0**-8  # unit roundoff of bfloat16 (8-bit significand)


def _load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True, map_location="cpu")


@pytest.fixture(scope="module")
def base_sd() -> dict[str, torch.Tensor]:
    sd = {}
    for shard in sorted((DATA / "chatglm-6b-tiny").glob("pytorch_model-*.bin")):
        sd.update(_load(shard))
    return sd


@pytest.fixture(scope="module")
def int4_sd() -> dict[str, torch.Tensor]:
    return _load(DATA / "chatglm-6b-tiny-int4" / "pytorch_model.bin")


@pytest.fixture(scope="module")
def int8_sd() -> dict[str, torch.Tensor]:
    return _load(DATA / "chatglm-6b-tiny-int8" / "pytorch_model.bin")


def _quantized_names(sd: dict[str, torch.Tensor]) -> list[str]:
    """'transformer.layers.N.<linear>' prefixes of the quantized linears in a state dict."""
    names = [
        k[: -len(".weight")]
        for k in sd
        if k.endswith(".weight") and k[: -len(".weight")].endswith(QUANTIZED_LINEAR_NAMES)
    ]
    assert len(names) == 3 * 4  # 3 layers x 4 linears in the tiny fixture
    return names


def _independent_unpack(packed: torch.Tensor) -> torch.Tensor:
    """Official nibble order decoded with plain unsigned arithmetic (no int8 shifts)."""
    u = packed.view(torch.uint8).to(torch.int16)  # [out, in/2] 0..255
    hi, lo = u // 16, u % 16
    hi, lo = hi - 16 * (hi >= 8), lo - 16 * (lo >= 8)  # sign-extend 4-bit two's complement
    return torch.stack((hi, lo), -1).flatten(-2).to(torch.int8)  # [out, in]


# ------------------------------------------------------------------------------------------
# primitives
# ------------------------------------------------------------------------------------------


def test_int8_rowwise_roundtrip():
    torch.manual_seed(0)
    w = torch.randn(37, 53) * torch.rand(37, 1)  # rows of different magnitude
    w[5] = 0  # an all-zero row must not produce NaNs
    for scale_dtype in (torch.float16, torch.float32):
        q, s = quantize_int8_rowwise(w, scale_dtype)
        assert q.dtype == torch.int8 and q.shape == w.shape and s.dtype == scale_dtype
        assert q.abs().max() <= 127
        err = (dequantize_int8(q, s) - w).abs()  # [out, in]
        # Half a step per element (+ the clamp of a down-rounded scale at the row max).
        assert (err <= s.float()[:, None] * 0.5 * (1 + 2**-9) + 1e-7).all()
        assert (dequantize_int8(q, s)[5] == 0).all()


def test_int8_official_matches_rowwise_recipe():
    torch.manual_seed(1)
    w = torch.randn(16, 64).half()
    q, s = quantize_int8_official(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float16
    assert torch.equal(s, (w.abs().amax(-1) / 127).half())
    # fp16 w / s then round differs from the fp32 recipe only at exact .5 ties, by one step.
    q32, _ = quantize_int8_rowwise(w, torch.float16)
    assert (q.int() - q32.int()).abs().max() <= 1


def test_int4_official_pack_unpack_roundtrip():
    vals = torch.arange(-7, 8, dtype=torch.int8)
    q = torch.cartesian_prod(vals, vals).reshape(15, 30)  # every (even, odd) pair of values
    packed = pack_int4_official(q)
    assert packed.dtype == torch.int8 and packed.shape == (15, 15)
    assert torch.equal(unpack_int4_official(packed), q)
    assert torch.equal(_independent_unpack(packed), q)
    # High nibble = even column: [3, -2] -> 0x3E.
    assert pack_int4_official(torch.tensor([[3, -2]], dtype=torch.int8)).view(torch.uint8) == 0x3E


def test_int4_official_quantize_roundtrip():
    torch.manual_seed(2)
    w = torch.randn(24, 40).half()
    packed, s = quantize_int4_official(w)
    assert packed.shape == (24, 20) and s.dtype == torch.float16
    q = unpack_int4_official(packed)
    assert q.abs().max() <= 7
    err = (dequantize_int4_official(packed, s) - w.float()).abs()
    # fp16 w / s is itself rounded (<= 7 * 2^-11 of a step) before round().
    assert (err <= s.float()[:, None] * (0.5 + 2**-8)).all()
    with pytest.raises(ValueError, match="even"):
        quantize_int4_official(torch.randn(4, 7))


@pytest.mark.parametrize("shape,group", [((16, 256), 32), ((7, 100), 32), ((5, 33), 64)])
def test_int4_grouped_roundtrip(shape, group):
    torch.manual_seed(3)
    w = torch.randn(*shape) + torch.randn(shape[0], 1)  # groups not centred on 0
    n_const = min(group, shape[1])
    w[0, :n_const] = 0.25  # a constant group (scale 0)
    packed, scales, zeros = quantize_int4_grouped(w, group)
    n_groups = -(-shape[1] // group)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], (shape[1] + 1) // 2)
    assert scales.shape == zeros.shape == (shape[0], n_groups)
    assert scales.dtype == zeros.dtype == torch.bfloat16
    q = unpack_int4_grouped(packed, shape[1])
    assert q.shape == shape and q.max() <= 15
    deq = dequantize_int4_grouped(packed, scales, zeros, group, shape[1])
    ref = (q.float() - 8) * scales.float().repeat_interleave(group, 1)[:, : shape[1]]
    ref += zeros.float().repeat_interleave(group, 1)[:, : shape[1]]
    assert torch.equal(deq, ref)
    s = scales.float().repeat_interleave(group, 1)[:, : shape[1]]
    z = zeros.float().repeat_interleave(group, 1)[:, : shape[1]]
    # Half a step, plus the bf16 rounding of the zero (<= u |zero|), plus the clamp margin.
    assert ((deq - w).abs() <= 0.5 * s + 1.01 * BF16_U * z.abs() + 0.02 * s + 1e-6).all()
    assert torch.equal(deq[0, :n_const], torch.full((n_const,), 0.25))


def test_int4_grouped_beats_symmetric():
    """The reason for the asymmetric format: lower error than absmax/7 groups."""
    torch.manual_seed(4)
    w = torch.randn(256, 512)
    packed, scales, zeros = quantize_int4_grouped(w, 64)
    asym = (dequantize_int4_grouped(packed, scales, zeros, 64, 512) - w).pow(2).mean()
    wg = w.view(256, -1, 64)
    s = wg.abs().amax(-1, keepdim=True) / 7
    sym = ((wg / s).round() * s - wg).pow(2).mean()
    assert asym < 0.8 * sym


# ------------------------------------------------------------------------------------------
# official fixtures (THUDM recipe)
# ------------------------------------------------------------------------------------------


def test_official_int8_bit_exact(base_sd, int8_sd):
    for name in _quantized_names(base_sd):
        q, s = quantize_int8_official(base_sd[name + ".weight"])
        assert torch.equal(q, int8_sd[name + ".weight"]), name
        assert s.dtype == torch.float16 and torch.equal(s, int8_sd[name + ".weight_scale"]), name


def test_official_int4_bit_exact(base_sd, int4_sd):
    for name in _quantized_names(base_sd):
        packed, s = quantize_int4_official(base_sd[name + ".weight"])
        assert torch.equal(packed, int4_sd[name + ".weight"]), name
        assert s.dtype == torch.float16 and torch.equal(s, int4_sd[name + ".weight_scale"]), name


def test_official_unpack_and_dequant(int4_sd, int8_sd):
    for name in _quantized_names(int4_sd):
        packed, scale = int4_sd[name + ".weight"], int4_sd[name + ".weight_scale"]
        q = unpack_int4_official(packed)
        assert torch.equal(q, _independent_unpack(packed)) and q.abs().max() <= 7
        ref = q.float() * scale.float()[:, None]
        assert torch.equal(dequantize_int4_official(packed, scale), ref)
        q8, s8 = int8_sd[name + ".weight"], int8_sd[name + ".weight_scale"]
        assert torch.equal(dequantize_int8(q8, s8), q8.float() * s8.float()[:, None])


# ------------------------------------------------------------------------------------------
# QuantizedLinear vs its reference
# ------------------------------------------------------------------------------------------

# (out, in, bits, group): odd sizes, out not a multiple of 16, in not a multiple of the group.
CASES = [
    (48, 256, 8, 0),
    (33, 70, 8, 0),
    (40, 128, 4, 0),
    (7, 30, 4, 0),
    (64, 256, 4, 32),
    (17, 100, 4, 32),
    (33, 200, 4, 64),
    (20, 130, 4, 128),
    (5, 257, 4, 256),
]


def _layer(out_f, in_f, bits, group, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    nn.init.normal_(lin.bias, std=0.5)
    return lin, QuantizedLinear.from_linear(lin, bits, group)


# Layers the CPU kernels take (K a multiple of the activation block), incl. odd row counts.
KERNEL_CASES = [
    (48, 256, 8, 0),
    (33, 384, 8, 0),
    (9, 64, 8, 0),
    (40, 128, 4, 0),
    (7, 320, 4, 0),
    (64, 256, 4, 32),
    (17, 192, 4, 32),
    (33, 256, 4, 64),
    (20, 384, 4, 128),
    (5, 512, 4, 256),
    # 8 or more activation blocks (summed 8 at a time) plus a remainder
    (10, 1152, 8, 0),
    (12, 1088, 4, 0),
    (24, 1152, 4, 128),
    (16, 1088, 4, 64),
    (6, 2304, 4, 256),
]


def kernel_bound(x: torch.Tensor, w: torch.Tensor, block: int) -> torch.Tensor:
    """Worst-case |error| of the int8-activation kernels, elementwise [M, N].

    Each activation block of `block` columns is rounded to int8 with scale amax/127, so every
    element moves by at most amax/254; the integer dot products are exact, and the float
    accumulation adds at most ~1e-5 relative to |x| @ |W|^T.
    """
    m, k = x.shape
    amax = x.abs().view(m, k // block, block).amax(-1)  # [M, B]
    wsum = w.abs().view(w.shape[0], k // block, block).sum(-1)  # [N, B]
    return (amax / 254) @ wsum.T + 1e-5 * (x.abs() @ w.abs().T)


needs_kernels = pytest.mark.skipif(not cpu_kernels.supported(),
                                   reason="the CPU kernels need numba and AVX2")


@pytest.mark.reduced_precision
@needs_kernels
@pytest.mark.parametrize("out_f,in_f,bits,group", KERNEL_CASES)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16, 41])
def test_cpu_kernel_within_stated_bound(out_f, in_f, bits, group, rows, monkeypatch):
    import localglm.quantize.linear as qlinear

    # a prompt's rows take these kernels too where the CPU has no bf16 GEMM
    monkeypatch.setattr(qlinear, "cpu_has_bf16_gemm", lambda: False)
    lin, m = _layer(out_f, in_f, bits, group)
    x = (torch.randn(rows, in_f) * torch.rand(in_f) * 3).half()  # uneven column magnitudes
    assert m.kernel(x) == "cpu-gemv"
    assert m.kernel(x.float()) == "reference"  # float32 activations: the exact mode
    w = m.dequantize()
    ref = x.double() @ w.double().T + lin.bias.detach().double()
    y = cpu_kernels.matmul_int8(x, m.weight, m.weight_scale) if bits == 8 else \
        cpu_kernels.matmul_int4(x, m.weight, m.weight_scale, m.weight_zero if group else None,
                                group)
    # forward() is that kernel, its result cast to x's dtype, plus the bias
    assert torch.equal(m(x), y.half() + lin.bias.detach().half())
    y = y + lin.bias.detach()  # float32: the kernel's own error, before the fp16 output
    err = (y.double() - ref).abs()
    bound = kernel_bound(x.double(), w.double(), cpu_kernels.block(bits, group, in_f))
    assert (err <= bound).all(), float((err - bound).max())
    # and the bound is not vacuous: the error is a small fraction of the output scale
    assert err.max() < 0.02 * (x.float().abs() @ w.abs().T).max()


@pytest.mark.reduced_precision
@needs_kernels
def test_cpu_kernel_reports_instruction_set():
    """The kernels compile for the instruction set numba targets (AVX2 forced by
    NUMBA_CPU_NAME/NUMBA_CPU_FEATURES, see test_isa.py), and that is what the layer reports."""
    _, m = _layer(64, 256, 4, 128)
    isa = cpu_kernels.isa()
    assert isa in ("avx2", "avx-vnni", "avx512-vnni")
    forced = os.environ.get("NUMBA_CPU_FEATURES")
    if forced:
        assert isa == ("avx2" if "+avx512vnni" not in forced and "+avxvnni" not in forced
                       else isa)
    assert m.describe_kernel(torch.randn(1, 256).bfloat16()) == f"numba {isa} int4"


@pytest.mark.parametrize("out_f,in_f,bits,group", CASES)
def test_forward_fp32_matches_reference(out_f, in_f, bits, group):
    """Layers the kernels cannot take (K not a multiple of the block) run the reference."""
    lin, m = _layer(out_f, in_f, bits, group)
    assert (m.in_features, m.out_features, m.bits, m.group_size) == (in_f, out_f, bits, group)
    x = torch.randn(2, 3, in_f)
    ref = x @ m.dequantize().T + lin.bias.detach()
    if not cpu_kernels.shape_ok(bits, group, in_f):
        assert m.kernel(x) == "reference"
        torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-5)
    # Weight error vs the float layer: at most half a quantization step (+ bf16 zero rounding).
    assert (m.dequantize() - lin.weight).abs().max() < 0.1


@pytest.mark.reduced_precision
@pytest.mark.parametrize("out_f,in_f,bits,group", KERNEL_CASES)
def test_prefill_tiles_match_reference(out_f, in_f, bits, group, monkeypatch):
    """More rows than the matrix-vector kernels take: dequantized tiles through a GEMM (the
    tile size shrunk so that several tiles are used), fp32 exact up to summation order."""
    import localglm.quantize.linear as qlinear

    monkeypatch.setattr(qlinear, "PREFILL_TILE_ROWS", 8)
    monkeypatch.setattr(qlinear, "cpu_has_bf16_gemm", lambda: True)  # tiles on any CPU
    lin, m = _layer(out_f, in_f, bits, group)
    x = torch.randn(qlinear.CPU_GEMV_MAX_ROWS + 1, in_f).half()  # fp16: always an fp32 GEMM
    if not cpu_kernels.supported():
        pytest.skip("the CPU kernels need numba and AVX2")
    assert m.kernel(x) == "cpu-tiled"
    ref = (x.float() @ m.dequantize().T).half().float() + lin.bias.detach()
    torch.testing.assert_close(m(x).float(), ref, rtol=2e-3, atol=1e-3 * ref.abs().max().item())


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 0), (4, 32)])
def test_torch_kernels_where_numba_cannot_run(bits, group, monkeypatch):
    """Without the numba kernels, bf16 calls of up to 256 rows take PyTorch's own kernels:
    within bf16 rounding of the reference (4 roundings of u = 2^-8, relative to the terms)."""
    monkeypatch.setattr(cpu_kernels, "supported", lambda: False)
    lin, m = _layer(48, 256, bits, group, seed=1)
    x = torch.randn(4, 256).bfloat16()
    assert m.kernel(x) == f"torch-int{bits}"
    w, b = m.dequantize(), lin.bias.detach()
    ref = x.float() @ w.T + b
    bound = 4 * BF16_U * (x.float().abs() @ w.abs().T + b.abs())
    y = m(x)
    assert y.dtype == torch.bfloat16 and m._torch_cache
    assert ((y.float() - ref).abs() <= bound).all()
    assert m.kernel(torch.randn(257, 256).bfloat16()) == "reference"


def test_bf16_int8_torch_kernel_needs_k_multiple_of_32(monkeypatch):
    # torch 2.13's AVX2 bf16 int8 kernel reads out of bounds for K % 8 != 0; such layers must
    # take the reference path instead of crashing.
    monkeypatch.setattr(cpu_kernels, "supported", lambda: False)
    _, m = _layer(8, 100, 8, 0)
    x = torch.randn(3, 100).bfloat16()
    assert m.kernel(x) == "reference"
    torch.testing.assert_close(m(x), m.forward_reference(x))


def test_invalid_group_sizes_raise():
    lin = nn.Linear(100, 8)
    for g in (16, 48, 100):
        with pytest.raises(ValueError, match=r"\[out=8, in=100\].*32, 64, 128, 256"):
            QuantizedLinear.from_linear(lin, 4, g)
    with pytest.raises(ValueError, match="per-row only"):
        QuantizedLinear.from_linear(lin, 8, 32)
    with pytest.raises(ValueError, match="even in_features"):
        QuantizedLinear.from_linear(nn.Linear(33, 8), 4, 0)
    with pytest.raises(ValueError, match="bits"):
        QuantizedLinear(16, 16, 3)
    assert INT4_GROUP_SIZES == (32, 64, 128, 256)


def test_float64_reference_keeps_precision():
    lin, m = _layer(16, 64, 8, 0)
    x = torch.randn(3, 64, dtype=torch.float64)
    y = m(x)
    assert y.dtype == torch.float64
    ref = x @ m.dequantize(torch.float64).T + lin.bias.detach().double()
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 0), (4, 32)])
def test_autograd_matches_reference(bits, group):
    lin, m = _layer(16, 64, bits, group)
    m.bias.requires_grad_(True)  # e.g. bias tuning
    x = torch.randn(2, 3, 64, requires_grad=True)
    weights = torch.arange(16.0)
    (m(x) * weights).sum().backward()
    w = m.dequantize()
    b = m.bias.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    (nn.functional.linear(xr, w, b) * weights).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.bias.grad, b.grad)
    # bf16 input: exact forward, backward through the fp32 dequantized weight.
    m.bias.requires_grad_(False)
    xb = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    m(xb).float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(xb.grad, w.sum(0).expand(4, 64).bfloat16())


def test_cast_keeps_scales_and_drops_kernel_cache(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "supported", lambda: False)
    _, m = _layer(32, 64, 4, 0)
    m(torch.randn(1, 64).bfloat16())
    assert m._torch_cache
    scale = m.weight_scale.clone()
    m.to(torch.bfloat16)
    assert m.weight_scale.dtype == torch.float16 and torch.equal(m.weight_scale, scale)
    assert m.bias.dtype == torch.bfloat16 and not m._torch_cache
    _, g = _layer(32, 64, 4, 32)
    g.half()
    assert g.weight_scale.dtype == g.weight_zero.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------
# whole model
# ------------------------------------------------------------------------------------------


class _Attention(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.query_key_value = nn.Linear(h, 3 * h)
        self.dense = nn.Linear(h, h)


class _MLP(nn.Module):
    def __init__(self, h, inner):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(h, inner)
        self.dense_4h_to_h = nn.Linear(inner, h)


class _Block(nn.Module):
    def __init__(self, h, inner):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(h)
        self.attention = _Attention(h)
        self.mlp = _MLP(h, inner)
        self.dense = nn.Linear(h, h)  # a "dense" outside attention/mlp: must stay float


class _Transformer(nn.Module):
    def __init__(self, h, n, inner):
        super().__init__()
        self.layers = nn.ModuleList(_Block(h, inner) for _ in range(n))


class _Model(nn.Module):
    """Same module names as localglm's ChatGLM model, plus linears that must not be touched."""

    def __init__(self, h=64, n=2, inner=256):
        super().__init__()
        self.transformer = _Transformer(h, n, inner)
        self.lm_head = nn.Linear(h, 100, bias=False)


def quantized(model: nn.Module, bits: int, group: int) -> nn.Module:
    """The loader's route: quantize the state dict as it streams, load into a skeleton."""
    sd = dict(quantize_stream(model.state_dict().items(), bits, group))
    with torch.device("meta"):
        skeleton = type(model)()
    make_quantized_skeleton(skeleton, bits, group, "localglm" if group else "official")
    skeleton.load_state_dict(sd, assign=True)
    return skeleton


def _expected(n=2):
    return {f"transformer.layers.{i}.{name}" for i in range(n) for name in QUANTIZED_LINEAR_NAMES}


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 0), (4, 32)])
def test_quantize_stream_swaps_exactly_the_four(bits, group):
    torch.manual_seed(6)
    model = _Model()
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "bias")}
    model = quantized(model, bits, group)
    swapped = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert swapped == _expected()
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            assert n not in swapped and torch.equal(m.weight, before[n])
        if isinstance(m, QuantizedLinear):
            assert (m.bits, m.group_size) == (bits, group)
            assert (m.dequantize() - before[n]).abs().max() < 0.05


@pytest.mark.parametrize(
    "bits,group,fmt", [(8, 0, "official"), (4, 0, "official"), (4, 64, "localglm")]
)
def test_safetensors_roundtrip(tmp_path, bits, group, fmt):
    torch.manual_seed(7)
    model = quantized(_Model(), bits, group)
    sd = model.state_dict()
    names = {k for k in sd if k.startswith("transformer.layers.0.attention.dense.")}
    expect = {"weight", "weight_scale", "bias"} | ({"weight_zero"} if group else set())
    assert names == {f"transformer.layers.0.attention.dense.{n}" for n in expect}
    save_file(sd, tmp_path / "model.safetensors")
    loaded = load_file(tmp_path / "model.safetensors")

    with torch.device("meta"):
        skeleton = _Model()
    make_quantized_skeleton(skeleton, bits, group, fmt)
    skeleton.load_state_dict(loaded, assign=True)
    new_sd = skeleton.state_dict()
    assert new_sd.keys() == sd.keys()
    for k, v in sd.items():
        assert new_sd[k].dtype == v.dtype and torch.equal(new_sd[k], v), k
    for name in _expected():
        a, b = model.get_submodule(name), skeleton.get_submodule(name)
        x = torch.randn(3, a.in_features).bfloat16()
        assert torch.equal(a(x), b(x))


def test_skeleton_loads_official_checkpoint(int4_sd):
    """THUDM's int4 state dict keys/dtypes load unchanged into an 'official' skeleton."""
    with torch.device("meta"):
        model = _Model(h=64, n=3, inner=256)  # the tiny fixture's sizes
    make_quantized_skeleton(model, 4, 0, "official")
    quantized = _expected(3)
    sub = {k: v for k, v in int4_sd.items() if k.rsplit(".", 1)[0] in quantized}
    assert len(sub) == 3 * len(quantized)  # weight, weight_scale, bias
    missing, unexpected = model.load_state_dict(sub, strict=False, assign=True)
    assert not unexpected
    assert not any(k.rsplit(".", 1)[0] in quantized for k in missing)
    m = model.get_submodule("transformer.layers.2.attention.query_key_value")
    key = "transformer.layers.2.attention.query_key_value"
    ref = dequantize_int4_official(int4_sd[key + ".weight"], int4_sd[key + ".weight_scale"])
    assert torch.equal(m.dequantize(), ref)


def test_skeleton_rejects_wrong_weight_dtype():
    with torch.device("meta"):
        model = _Model()
    make_quantized_skeleton(model, 4, 32, "localglm")
    sd = quantized(_Model(), 4, 0).state_dict()  # int8-packed official weights
    with pytest.raises(RuntimeError, match="uint8"):
        model.load_state_dict(sd, assign=True)
    with pytest.raises(ValueError):
        make_quantized_skeleton(_Model(), 4, 32, "official")


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits,group", [(8, 0), (4, 0), (4, 32), (4, 128)])
def test_prefill_tiles_are_the_reference_values(bits, group, dtype):
    """The numba tile dequantization gives exactly the reference's values (rounded once to
    bf16 for a bf16 tile), for any row range."""
    _, m = _layer(70, 256, bits, group)
    out = torch.empty(30, 256, dtype=dtype)
    cpu_kernels.dequantize_tile(m.weight, m.weight_scale, m.weight_zero if group else None,
                                bits, group, slice(40, 70), out)
    assert torch.equal(out, m.dequantize(dtype)[40:70])
