"""Everything needed to rebuild the exact PyTorch model a version was exported from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field, computed_field, model_validator
from torch import nn

from builder.options import BuildOptions
from builder.resnet import TorchNet, create_model
from builder.weights import load_weights

BN_STATISTICS_BATCH = 8


def set_batchnorm_statistics(model: TorchNet, seed: int, batch: int = BN_STATISTICS_BATCH) -> None:
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


class Recipe(BuildOptions):
    """A build's options as verification.json records them, resolved (the head's size, the
    name and version, absolute paths), plus the checksum of the checkpoint it read.

    Its JSON is its own ``model_dump(mode="json")``; ``Recipe.model_validate`` reads it back.
    """

    num_classes: int = Field(ge=1, description="size of the head")
    name: str = Field(description="model name in the repository")
    version: int = Field(ge=1, description="version number")
    weights: Path | None = Field(  # type: ignore[assignment]
        None, description="the checkpoint read, as a local file; None: random weights"
    )
    weights_sha256: str | None = Field(
        None, description="sha256 of the checkpoint at build time; None: random weights"
    )
    weights_origin: str | None = Field(
        None, description="what --weights named: 'torchvision <url>', a URL, or the file"
    )

    @model_validator(mode="before")
    @classmethod
    def _without_computed(cls, data: Any) -> Any:
        """A recorded recipe carries its computed fields; they are derived again, not read."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k not in cls.model_computed_fields}
        return data

    @computed_field  # type: ignore[prop-decorator]
    @property
    def bn_statistics(self) -> dict[str, Any] | None:
        """How random weights' BatchNorm statistics were set (`set_batchnorm_statistics`)."""
        if self.weights is not None:
            return None
        return {"batch": BN_STATISTICS_BATCH, "seed": self.seed, "images": "N(0, 1)"}

    @property
    def io_dtype(self) -> str | None:
        """The graph's input/output dtype where it differs from config.json's."""
        return "float16" if self.fp16_io else None

    def model(self) -> TorchNet:
        """The fp32 model in eval mode; reloads the checkpoint when there is one."""
        model = create_model(self.arch, self)
        if self.weights is not None:
            load_weights(model, self.weights, self.arch)
        else:
            set_batchnorm_statistics(model, self.seed)
        return model.eval()
