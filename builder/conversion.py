"""fp16 and int8 forms of an exported fp32 graph.

- fp16 (for GPUs): ONNX Runtime's own float16 converter
  (``onnxruntime.transformers.float16``, the converter of onnxconverter-common kept in step
  with ONNX Runtime, so no extra dependency). Weights and activations become float16;
  graph inputs and outputs stay float32 unless ``fp16_io`` (then the server casts what it
  feeds and reads). ONNX Runtime's CPU provider runs the graph too — where it has no
  float16 kernel it inserts casts around the float32 kernel — so the build verifies fp16
  models on any machine (the rounding of weights and activations, not float16 arithmetic).
- int8 (for CPUs): ONNX Runtime's static quantization in QDQ format, per-channel
  symmetric int8 weights and asymmetric uint8 activations (its advice for x86 with VNNI),
  with MinMax ranges calibrated on the images of a `builder.calibration.CalibrationSet`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

CALIBRATION_BATCH = 8


def to_fp16(source: Path, target: Path, fp16_io: bool) -> None:
    """Write ``source`` with float16 weights and compute to ``target``."""
    converted = OnnxModel(
        convert_float_to_float16(onnx.load(str(source)), keep_io_types=not fp16_io)
    )
    converted.topological_sort()  # the converter appends the input casts after their users
    onnx.save(converted.model, str(target))


class _Batches(CalibrationDataReader):
    def __init__(self, input_name: str, images: np.ndarray) -> None:
        self._batches: Iterator[np.ndarray] = iter(
            images[i : i + CALIBRATION_BATCH] for i in range(0, len(images), CALIBRATION_BATCH)
        )
        self._input = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._input: batch}


def to_int8(source: Path, target: Path, input_name: str, calibration: np.ndarray) -> None:
    """Quantize ``source`` to ``target`` (QDQ, per-channel weights), calibrated on the model
    inputs ``calibration`` (batch axis first)."""
    with tempfile.TemporaryDirectory(prefix="quantize-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        # ONNX Runtime's recommended pre-processing: shape inference and graph optimization,
        # so quantization sees the graph the session will run.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(target),
            _Batches(input_name, calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
