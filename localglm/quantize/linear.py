"""`QuantizedLinear`: one weight-only int8/int4 layer that holds a stored format and picks a
kernel per call.

The layer keeps exactly the stored tensors (what ``state_dict`` saves and what a converted
checkpoint maps), and on the CPU the numba kernels read those same bytes, so there is one copy
of every weight. Per call:

* CPU, decode and small batches (up to `CPU_GEMV_MAX_ROWS` rows), and prompts of any length
  on CPUs without native bf16 GEMM: `cpu_kernels` (int8 activations, integer multiply-add;
  on AVX2 2-2.5x faster than dequantizing to float32 for a GEMM, measured up to 1000 rows);
* CPU with AVX512-BF16/AMX, more rows (prefill): the weight is dequantized in tiles of
  `PREFILL_TILE_ROWS` output rows and multiplied by the bf16 GEMM (float32 for fp16
  activations), so memory stays bounded;
* CUDA, bf16 activations, int4: PyTorch's int4 kernel (a derived, unsaved copy);
* float32 activations (the exact mode), anything else, and every call that needs gradients:
  `forward_reference` (dequantize, then F.linear), the path every kernel is tested against.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels, torch_kernels
from .formats import (
    FORMATS,
    INT4_GROUP_SIZES,
    LOCAL_SCALE_DTYPE,
    QUANTIZED_LINEAR_NAMES,
    dequantize_int4_grouped,
    dequantize_int4_official,
    dequantize_int8,
    quantize_int4_grouped,
    quantize_int4_official,
    quantize_int8_official,
)

# Rows (tokens) up to which a CPU with native bf16 GEMM runs the integer kernels; above,
# tiles of dequantized weights go through the GEMM (benchmarks/bench_linear.py times both).
CPU_GEMV_MAX_ROWS = 16
PREFILL_TILE_ROWS = 1024
# A prompt's rows go through the integer kernels this many at a time, each block's float32
# result cast into the output at once: a 1000-token prompt never holds the whole float32
# product (62 MiB for dense_h_to_4h).
CPU_GEMV_CHUNK_ROWS = 256


def cpu_has_bf16_gemm() -> bool:
    """Whether the CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX)."""
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX512",):
        return False
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere), read once."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.split(":", 1)[-1].split())


def _tile_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """The GEMM dtype of the prefill tiles: bf16 for bf16 activations where the CPU multiplies
    bf16 natively, else float32."""
    return torch.bfloat16 if x_dtype == torch.bfloat16 and cpu_has_bf16_gemm() else torch.float32


def _check_config(
    in_features: int, out_features: int, bits: int, group_size: int, fmt: str
) -> None:
    shape = f"[out={out_features}, in={in_features}]"
    if bits not in (4, 8):
        raise ValueError(f"quantization bits must be 4 or 8, got {bits} (layer {shape})")
    if fmt not in FORMATS:
        raise ValueError(f"quantization format must be one of {FORMATS}, got {fmt!r}")
    if group_size and bits == 8:
        raise ValueError(
            f"int8 is per-row only (group_size 0), got group_size {group_size} (layer {shape})"
        )
    if group_size and group_size not in INT4_GROUP_SIZES:
        raise ValueError(
            f"int4 group_size {group_size} is not supported for layer {shape}; allowed: 0 (one "
            f"scale per row) or {', '.join(map(str, INT4_GROUP_SIZES))}"
        )
    if group_size and fmt == "official":
        raise ValueError(
            f"the official format has one scale per row; group_size {group_size} needs "
            "format 'localglm'"
        )
    if bits == 4 and not group_size and in_features % 2:
        raise ValueError(
            f"per-row int4 (official layout) packs two columns per byte and needs an even "
            f"in_features, got layer {shape}; use group_size "
            f"{'/'.join(map(str, INT4_GROUP_SIZES))} instead"
        )


class QuantizedLinear(nn.Module):
    """Weight-only int8/int4 linear. Same call signature as nn.Linear.

    Buffers (saved by ``state_dict``):

    * ``weight``: int8 [out, in] (bits 8), int8 [out, in/2] (bits 4, group_size 0: official
      packed nibbles) or uint8 [out, ceil(in/2)] (bits 4, group_size > 0: localglm nibbles);
    * ``weight_scale``: float16 [out] (per row) or bfloat16 [out, ceil(in/group_size)];
    * ``weight_zero``: bfloat16 [out, ceil(in/group_size)], group-wise int4 only;
    * ``bias`` (a frozen Parameter, like nn.Linear's) [out], or None.

    With group_size 0 the key names, shapes and dtypes are those of THUDM's int8/int4
    checkpoints, so their tensors load unchanged. ``weight_scale``/``weight_zero`` keep their
    dtype when the module is cast; the bias follows the model dtype like any parameter.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int = 0,
        bias: bool = True,
        *,
        fmt: str = "localglm",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Empty (zero-filled) layer; fill it with `load_state_dict` or `from_linear`.

        ``dtype`` is the dtype of the bias only (the weights have fixed integer dtypes).
        """
        super().__init__()
        _check_config(in_features, out_features, bits, group_size, fmt)
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        if bits == 8:
            w_shape, w_dtype = (out_features, in_features), torch.int8
        elif not group_size:
            w_shape, w_dtype = (out_features, in_features // 2), torch.int8
        else:
            w_shape, w_dtype = (out_features, (in_features + 1) // 2), torch.uint8
        self.register_buffer("weight", torch.zeros(w_shape, dtype=w_dtype, device=device))
        if group_size:
            s_shape = (out_features, math.ceil(in_features / group_size))
            s_dtype = LOCAL_SCALE_DTYPE
        else:
            s_shape, s_dtype = (out_features,), torch.float16
        self.register_buffer("weight_scale", torch.zeros(s_shape, dtype=s_dtype, device=device))
        if group_size:
            self.register_buffer("weight_zero", torch.zeros(s_shape, dtype=s_dtype, device=device))
        if bias:
            b = torch.zeros(out_features, dtype=dtype or torch.float32, device=device)
            self.bias = nn.Parameter(b, requires_grad=False)
        else:
            self.register_parameter("bias", None)
        # Derived kernel operands, never saved: PyTorch's per (device, dtype), and under
        # "numpy" the numba kernels' views of the stored tensors.
        self._torch_cache: dict = {}

    @property
    def fmt(self) -> str:
        """Stored layout: 'official' (one scale per row) or 'localglm' (group-wise int4)."""
        return "localglm" if self.group_size else "official"

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}"
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 0) -> QuantizedLinear:
        """Quantize an nn.Linear. group_size 0 uses THUDM's per-row recipe (bit-identical to
        their int8/int4 checkpoints); group_size 32/64/128/256 (int4 only) the localglm
        group-wise format."""
        w = linear.weight.detach()  # [out, in]
        out_f, in_f = w.shape
        fmt = "localglm" if group_size else "official"
        _check_config(in_f, out_f, bits, group_size, fmt)
        m = cls(in_f, out_f, bits, group_size, linear.bias is not None, fmt=fmt, device="meta")
        if bits == 8:
            m.weight, m.weight_scale = quantize_int8_official(w)
        elif not group_size:
            m.weight, m.weight_scale = quantize_int4_official(w)
        else:
            m.weight, m.weight_scale, m.weight_zero = quantize_int4_grouped(w, group_size)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    # -- reference ------------------------------------------------------------------------

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice | None = None
                   ) -> torch.Tensor:
        """The float weight [out, in] (or the given output rows) the stored tensors represent,
        computed in float32."""
        rows = rows or slice(None)
        w, s = self.weight[rows], self.weight_scale[rows]
        if self.bits == 8:
            return dequantize_int8(w, s, dtype)
        if not self.group_size:
            return dequantize_int4_official(w, s, dtype)
        return dequantize_int4_grouped(w, s, self.weight_zero[rows], self.group_size,
                                       self.in_features, dtype)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize, then F.linear (differentiable w.r.t. x).

        On CPU, bf16/fp16 inputs are computed in float32 (the result is cast back): exact, and
        without native bf16 units 4-6x faster than a bf16 GEMM. Otherwise the weight is
        dequantized to x's dtype.
        """
        half = x.dtype in (torch.bfloat16, torch.float16)
        compute = torch.float32 if half and x.device.type == "cpu" else x.dtype
        bias = None if self.bias is None else self.bias.to(compute)
        return F.linear(x.to(compute), self.dequantize(compute), bias).to(x.dtype)

    # -- kernels --------------------------------------------------------------------------

    def kernel(self, x: torch.Tensor) -> str:
        """Which path `forward` takes for x: 'cpu-gemv', 'cpu-tiled', 'torch-int4', 'torch-int8'
        or 'reference'."""
        dev = x.device.type
        if x.dtype not in (torch.bfloat16, torch.float16):
            return "reference"  # float32 activations ask for the exact path
        if dev == "cpu":
            if not (cpu_kernels.supported()
                    and cpu_kernels.shape_ok(self.bits, self.group_size, self.in_features)):
                return self._torch_cpu_kernel(x)
            rows = x.numel() // self.in_features
            return "cpu-tiled" if rows > CPU_GEMV_MAX_ROWS and cpu_has_bf16_gemm() \
                else "cpu-gemv"
        if dev == "cuda" and self.bits == 4 and x.dtype == torch.bfloat16 \
                and torch_kernels.HAS_CUDA_INT4:
            # PyTorch's CUDA int8 kernel is a naive fp32 loop, slower than dequantize + cuBLAS.
            return "torch-int4"
        return "reference"

    def _torch_cpu_kernel(self, x: torch.Tensor) -> str:
        """Fallback where the numba kernels cannot run: PyTorch's CPU kernels, which are only
        vectorized for bf16 activations, and for up to 256 rows."""
        rows = x.numel() // self.in_features
        if x.dtype != torch.bfloat16 or rows > 256:
            return "reference"
        if self.bits == 8:
            # The AVX2 bf16 int8 kernel reads past the row end unless K % 8 == 0.
            return "torch-int8" if self.in_features % 32 == 0 else "reference"
        return "torch-int4"

    def describe_kernel(self, x: torch.Tensor) -> str:
        """One line for reports: the path and, for the CPU kernels, the instruction set."""
        k = self.kernel(x)
        if k == "cpu-gemv":
            return f"numba {cpu_kernels.isa()} int{self.bits}"
        if k == "cpu-tiled":
            gemm = "bf16" if _tile_dtype(x.dtype) == torch.bfloat16 else "fp32"
            return f"dequantize tiles + {gemm} GEMM"
        if k.startswith("torch-"):
            return f"PyTorch _weight_{k[6:]}pack_mm"
        return "dequantize + matmul (reference)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable w.r.t. x (and a trainable bias): calls that need gradients run the
        exact reference path without keeping a dequantized weight alive for backward."""
        if torch.is_grad_enabled() and (
            x.requires_grad or (self.bias is not None and self.bias.requires_grad)
        ):
            return _QuantizedLinearFn.apply(x, self.bias, self)
        return self._forward_no_grad(x)

    def _forward_no_grad(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel(x)
        if k == "reference":
            return self.forward_reference(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if k == "cpu-gemv":
            zero = self.weight_zero if self.bits == 4 and self.group_size else None
            # views of the stored tensors, kept while the layer holds the same memory
            at = (self.weight.data_ptr(), self.weight_scale.data_ptr())
            at_ops = self._torch_cache.get("numpy")
            if at_ops is None or at_ops[0] != at:
                at_ops = self._torch_cache["numpy"] = (
                    at, cpu_kernels.operands(self.weight, self.weight_scale, zero))
            y = self._forward_gemv(x2, zero, at_ops[1])
        elif k == "cpu-tiled":
            y = self._forward_tiled(x2)
        else:
            y = self._forward_torch(x2, k)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def _forward_gemv(self, x2: torch.Tensor, zero: torch.Tensor | None,
                      ops: tuple) -> torch.Tensor:
        """The numba kernels, CPU_GEMV_CHUNK_ROWS rows at a time; [M, N] in x2's dtype."""
        def product(rows: torch.Tensor) -> torch.Tensor:  # float32
            if self.bits == 8:
                return cpu_kernels.matmul_int8(rows, self.weight, self.weight_scale, ops)
            return cpu_kernels.matmul_int4(rows, self.weight, self.weight_scale, zero,
                                           self.group_size, ops)

        m = x2.shape[0]
        if m <= CPU_GEMV_CHUNK_ROWS:
            return product(x2).to(x2.dtype)
        out = torch.empty(m, self.out_features, dtype=x2.dtype)
        for r0 in range(0, m, CPU_GEMV_CHUNK_ROWS):
            r1 = min(m, r0 + CPU_GEMV_CHUNK_ROWS)
            out[r0:r1] = product(x2[r0:r1])
        return out

    def _forward_tiled(self, x2: torch.Tensor) -> torch.Tensor:
        """Prefill: dequantize PREFILL_TILE_ROWS output rows at a time into the GEMM dtype."""
        gemm = _tile_dtype(x2.dtype)
        xg = x2.to(gemm)
        out = torch.empty(x2.shape[0], self.out_features, dtype=gemm)  # [M, N]
        tile = torch.empty(min(PREFILL_TILE_ROWS, self.out_features), self.in_features,
                           dtype=gemm)
        zero = self.weight_zero if self.group_size else None
        for r0 in range(0, self.out_features, PREFILL_TILE_ROWS):
            rows = slice(r0, min(self.out_features, r0 + PREFILL_TILE_ROWS))
            w = cpu_kernels.dequantize_tile(self.weight, self.weight_scale, zero, self.bits,
                                            self.group_size, rows, tile[: rows.stop - r0])
            torch.matmul(xg, w.T, out=out[:, rows])
        return out.to(x2.dtype)

    def _forward_torch(self, x2: torch.Tensor, kernel: str) -> torch.Tensor:
        ops = self._torch_operands(x2.device, x2.dtype)
        if kernel == "torch-int8":
            w, scale = ops
            return torch.ops.aten._weight_int8pack_mm(x2.contiguous(), w, scale)  # [M, N]
        packed, sz, k_pad, g = ops
        if k_pad != self.in_features:
            x2 = F.pad(x2, (0, k_pad - self.in_features))  # [M, K_pad], zero columns
        y = torch_kernels.int4_kernel_mm(x2.contiguous(), packed, g, sz)  # [M, N_pad]
        return y[:, : self.out_features]

    def _torch_operands(self, device: torch.device, dtype: torch.dtype) -> tuple:
        key = (device, dtype)
        ops = self._torch_cache.get(key)
        if ops is not None:
            return ops
        with torch.no_grad():
            if self.bits == 8:
                ops = (self.weight.contiguous(), self.weight_scale.to(dtype))
            elif not self.group_size:
                # Signed nibble s -> s + 8 is s XOR 8 per nibble: unsigned 1..15, zero = 0.
                u = self.weight.view(torch.uint8) ^ 0x88  # [N, K/2]
                q = torch_kernels.unpack_uint4_int32(u, self.in_features)  # [N, K]
                g = torch_kernels.OFFICIAL_INT4_KERNEL_GROUP
                n_groups = math.ceil(self.in_features / g)
                scales = self.weight_scale[:, None].expand(-1, n_groups)  # [N, G]: row scale
                ops = torch_kernels.int4_kernel_layout(q, scales, None, g, dtype) + (g,)
            else:
                q = torch_kernels.unpack_uint4_int32(self.weight, self.in_features)
                ops = torch_kernels.int4_kernel_layout(
                    q, self.weight_scale, self.weight_zero, self.group_size, dtype
                ) + (self.group_size,)
        self._torch_cache[key] = ops
        return ops

    # -- housekeeping ---------------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        # Moving/casting invalidates derived operands. Scales keep their dtype: they are part
        # of the stored format, and e.g. fp16 -> bf16 would lose precision.
        self._torch_cache = {}
        kept = {
            n: self._buffers[n].dtype
            for n in ("weight_scale", "weight_zero")
            if self._buffers.get(n) is not None
        }
        before = {n: self._buffers[n] for n in kept}
        super()._apply(fn, recurse)
        for n, dt in kept.items():
            new = self._buffers[n]
            if new.dtype != dt:
                self._buffers[n] = before[n].to(device=new.device)
        return self

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        self._torch_cache = {}
        w = state_dict.get(prefix + "weight")
        expect = torch.uint8 if self.group_size else torch.int8
        if w is not None and w.dtype != expect:
            error_msgs.append(
                f"{prefix}weight: int{self.bits} group_size {self.group_size} weights are "
                f"{expect}, the checkpoint has {w.dtype} (wrong quantization_bit/format?)"
            )
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class _QuantizedLinearFn(torch.autograd.Function):
    """y = layer(x) with a backward that dequantizes the weight again instead of saving it:
    autograd would otherwise keep one float copy of every quantized weight until backward
    (LoRA training over a quantized model)."""

    @staticmethod
    def forward(ctx, x, bias, layer):  # grad mode is off in here
        ctx.layer = layer
        return layer.forward_reference(x)

    @staticmethod
    def backward(ctx, grad):
        layer = ctx.layer
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            half = grad.dtype in (torch.bfloat16, torch.float16)
            compute = torch.float32 if half and grad.device.type == "cpu" else grad.dtype
            w = layer.dequantize(compute)  # [out, in]
            grad_x = (grad.to(compute) @ w).to(grad.dtype)  # [..., in]
        if ctx.needs_input_grad[1]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0).to(layer.bias.dtype)  # [out]
        return grad_x, grad_b, None


def _matching_linears(
    model: nn.Module, names: Iterable[str]
) -> list[tuple[nn.Module, str, nn.Linear]]:
    names = tuple(names)
    found = []
    for qual, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and any(qual == n or qual.endswith("." + n) for n in names):
            parent_name, _, child = qual.rpartition(".")
            found.append((model.get_submodule(parent_name), child, mod))
    return found


def make_quantized_skeleton(
    model_on_meta: nn.Module,
    bits: int,
    group_size: int = 0,
    fmt: str = "official",
    *,
    names: Iterable[str] = QUANTIZED_LINEAR_NAMES,
) -> nn.Module:
    """Swap the matching nn.Linear children for empty QuantizedLinear modules (in place).

    The result accepts a state dict in the stored format -- THUDM's int8/int4 checkpoints for
    fmt 'official', localglm's own files for 'localglm' -- via
    ``model.load_state_dict(sd, assign=True)``. Config fields: ``quantization_bit`` -> bits,
    ``quantization_group_size`` -> group_size, ``quantization_format`` -> fmt.
    """
    if fmt == "official" and group_size:
        raise ValueError("quantization_format 'official' has no groups (group_size must be 0)")
    for parent, child, linear in _matching_linears(model_on_meta, names):
        bias_dtype = linear.bias.dtype if linear.bias is not None else None
        q = QuantizedLinear(
            linear.in_features,
            linear.out_features,
            bits,
            group_size,
            linear.bias is not None,
            fmt=fmt,
            device=linear.weight.device,
            dtype=bias_dtype,
        )
        setattr(parent, child, q)
    return model_on_meta


def kernel_report(model: nn.Module, dtype: torch.dtype, rows: Iterable[int] = (1, 1000)
                  ) -> dict[str, str]:
    """Which kernel each quantized layer shape takes, for ``rows`` tokens per call:
    {"[out x in] int4 g128, 1 row": "numba avx512-vnni int4", ...}."""
    report = {}
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            dev = m.weight.device
            for r in rows:
                x = torch.empty(r, m.in_features, dtype=dtype, device=dev)
                g = f" g{m.group_size}" if m.group_size else ""
                key = (f"[{m.out_features}x{m.in_features}] int{m.bits}{g}, "
                       f"{r} row{'s' if r > 1 else ''}")
                report[key] = m.describe_kernel(x)
    return report
