"""The numeric precisions a build can export (torch- and onnx-free, for argument parsing)."""

from __future__ import annotations

from enum import StrEnum


class Precision(StrEnum):
    FP32 = "fp32"  # as exported
    FP16 = "fp16"  # float16 weights and compute, for GPUs (builder.conversion.to_fp16)
    INT8 = "int8"  # static QDQ quantization, for CPUs (builder.conversion.to_int8)
