"""A graph's input: the preprocessing numbers config.json gives clients, and the layer that
normalizes uint8 pixels inside a uint8 graph."""

from __future__ import annotations

import torch
from torch import nn

from builder.architectures import ArchSpec, Dataset
from server.repository import CIFAR_MEAN, CIFAR_STD, Preprocessing


def preprocessing_for(spec: ArchSpec) -> Preprocessing:
    """torchvision's eval transform for ImageNet nets; no resize beyond 32×32 for CIFAR nets."""
    if spec.dataset is Dataset.IMAGENET:
        return Preprocessing(resize=256, crop=224)
    return Preprocessing(resize=32, crop=32, mean=CIFAR_MEAN, std=CIFAR_STD)


class PixelInput(nn.Module):
    """Takes uint8 NHWC RGB pixels: cast, scale to [0, 1], normalize, transpose to NCHW.

    ``(x / 255 - mean) / std`` is computed as ``(x - 255 mean) / (255 std)``: one Sub, one Div.
    """

    def __init__(self, model: nn.Module, preprocessing: Preprocessing) -> None:
        super().__init__()
        self.model = model
        mean = torch.tensor(preprocessing.mean, dtype=torch.float32) * 255.0
        std = torch.tensor(preprocessing.std, dtype=torch.float32) * 255.0
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).to(torch.float32)
        return self.model((x - self.mean) / self.std)
