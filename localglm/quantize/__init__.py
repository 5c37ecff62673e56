"""Weight-only int8/int4 quantization.

`formats` holds the stored formats and their pure quantize/dequantize primitives (the
reference), `cpu_kernels` the numba CPU kernels, `torch_kernels` PyTorch's own kernels (CUDA,
and CPUs the numba kernels cannot serve), and `linear` the layer that holds one stored weight
and picks a kernel per call.
"""

from .formats import (
    DEFAULT_GROUP_SIZE,
    FORMATS,
    INT4_GROUP_SIZES,
    QUANTIZED_LINEAR_NAMES,
    SCALE_SUFFIXES,
    dequantize_int4_grouped,
    dequantize_int4_official,
    dequantize_int8,
    pack_int4_official,
    quantize_int4_grouped,
    quantize_int4_official,
    quantize_int8_official,
    quantize_int8_rowwise,
    unpack_int4_grouped,
    unpack_int4_official,
)
from .linear import QuantizedLinear, kernel_report, make_quantized_skeleton

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "FORMATS",
    "INT4_GROUP_SIZES",
    "QUANTIZED_LINEAR_NAMES",
    "SCALE_SUFFIXES",
    "QuantizedLinear",
    "dequantize_int4_grouped",
    "dequantize_int4_official",
    "dequantize_int8",
    "kernel_report",
    "make_quantized_skeleton",
    "pack_int4_official",
    "quantize_int4_grouped",
    "quantize_int4_official",
    "quantize_int8_official",
    "quantize_int8_rowwise",
    "unpack_int4_grouped",
    "unpack_int4_official",
]
