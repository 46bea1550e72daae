"""Everything needed to rebuild the exact PyTorch model a version was exported from."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from builder.architectures import Layout
from builder.precision import Precision
from builder.registry import REGISTRY
from builder.resnet import Classifier, ModelOptions, create_model
from builder.weights import WeightsSource, load_weights

CALIBRATION_BATCH = 8


def calibrate_batchnorm(model: Classifier, seed: int, batch: int = CALIBRATION_BATCH) -> None:
    """Set every BatchNorm's running statistics from one seeded batch of N(0, 1) images.

    Randomly initialized residual nets double their activations' variance at each block
    when BatchNorm uses the untrained statistics (mean 0, variance 1): resnet152's logits
    reach 1e7 and resnet1202's overflow to inf. Statistics measured on a batch keep every
    layer near unit variance, so the served outputs are finite and the ONNX Runtime vs
    PyTorch comparison is meaningful. Weights, biases and the parameter count are unchanged.
    """
    generator = torch.Generator().manual_seed(seed)
    size = model.spec.input_size
    images = torch.randn(batch, 3, size, size, generator=generator)
    saved = {}
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            saved[module] = module.momentum
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one batch gives its exact statistics
    model.eval()
    for module in saved:
        module.train()  # BatchNorm alone: stochastic depth stays off, the pass deterministic
    with torch.no_grad():
        model(images)
    for module, momentum in saved.items():
        module.momentum = momentum
    model.eval()


@dataclass(frozen=True)
class Recipe:
    """Architecture and options, plus either a checkpoint or the seed of random weights, and
    the precision the graph was converted to (with, for int8, where its calibration came
    from: `builder.calibration`'s record)."""

    arch: str
    num_classes: int
    layout: Layout = Layout.TORCHVISION
    seed: int = 0
    zero_init_last: bool = False
    weights: WeightsSource | None = None
    stochastic_depth: float | None = None  # a training option: the eval model is the same
    precision: Precision = Precision.FP32
    fp16_io: bool = False
    calibration: dict[str, Any] | None = None

    @property
    def calibration_batch(self) -> int | None:
        return None if self.weights else CALIBRATION_BATCH

    @property
    def io_dtype(self) -> str | None:
        """The graph's input/output dtype where it differs from config.json's."""
        return "float16" if self.fp16_io else None

    def model(self) -> Classifier:
        """The fp32 model in eval mode; reloads the checkpoint when there is one."""
        options = ModelOptions(
            self.num_classes, self.layout, self.zero_init_last, self.seed, self.stochastic_depth
        )
        model = create_model(self.arch, options)
        if self.weights is not None:
            load_weights(model, self.weights.path, self.arch)
        else:
            calibrate_batchnorm(model, self.seed)
        return model.eval()

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["layout"] = self.layout.value
        record["precision"] = self.precision.value
        record["weights"] = (
            None
            if self.weights is None
            else {"path": str(self.weights.path), "sha256": self.weights.sha256}
        )
        record["bn_calibration"] = (
            None
            if self.calibration_batch is None
            else {"batch": self.calibration_batch, "seed": self.seed, "images": "N(0, 1)"}
        )
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Recipe:
        weights = record.get("weights")
        return cls(
            arch=REGISTRY.get(record["arch"]).name,
            num_classes=int(record["num_classes"]),
            layout=Layout(record.get("layout", Layout.TORCHVISION)),
            seed=int(record.get("seed", 0)),
            zero_init_last=bool(record.get("zero_init_last", False)),
            weights=None
            if weights is None
            else WeightsSource(path=Path(weights["path"]), sha256=weights["sha256"]),
            stochastic_depth=record.get("stochastic_depth"),
            precision=Precision(record.get("precision", Precision.FP32)),
            fp16_io=bool(record.get("fp16_io", False)),
            calibration=record.get("calibration"),
        )
