"""``resnet-serve train``: a CIFAR-style ResNet on scikit-learn's digits, on the CPU, in minutes.

It trains (SGD with Nesterov momentum, one-cycle learning rate, ±2 pixel shifts), saves the
weights as a torchvision-format checkpoint, writes the split as PNG folders, and publishes
the model through the normal build path (`builder.build.build` with ``weights=`` the
checkpoint, labels ``0``…``9``): the same export and checks as any other model, and
``resnet-serve verify`` can rebuild it from the recorded checkpoint. Other precisions are
built beside it as ``<name>_fp16`` and ``<name>_int8``, the latter calibrated on the
training images.

    <out>/<name>.pth                  the trained state dict
    <out>/train/<digit>/<i>.png       the 1,437 training images (int8 calibration)
    <out>/held_out/<digit>/<i>.png    the 360 held-out images
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from builder.architectures import Dataset
from builder.build import build, model_config
from builder.digits import LABELS, inputs, load_digits, write_pngs
from builder.options import BuildOptions
from builder.precision import Precision
from builder.registry import REGISTRY
from builder.resnet import create_model

SHIFT = 2  # pixels of random translation in training


@dataclass(frozen=True)
class TrainRequest:
    out: Path = Path("digits")
    repo: Path = Path("models")
    name: str = "digits"
    arch: str = "resnet20"
    epochs: int = 8
    batch_size: int = 64
    max_lr: float = 0.2
    weight_decay: float = 5e-4
    seed: int = 0
    stochastic_depth: float | None = None
    precisions: tuple[Precision, ...] = (Precision.FP32,)


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    accuracy: float  # held-out, PyTorch model in eval mode
    train_seconds: float
    versions: dict[Precision, Path] = field(default_factory=dict)  # published version dirs


def _shift(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by up to ±SHIFT pixels, the border repeated into the gap."""
    size = batch.shape[-1]
    padded = nn.functional.pad(batch, (SHIFT,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * SHIFT + 1, (len(batch), 2), generator=generator).tolist()
    return torch.stack(
        [
            img[:, dy : dy + size, dx : dx + size]
            for img, (dy, dx) in zip(padded, offsets, strict=True)
        ]
    )


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(chunk).argmax(1) for chunk in images.split(256)])
    return float((predicted == labels).float().mean())


def train(request: TrainRequest) -> TrainResult:
    spec = REGISTRY.get(request.arch)
    if spec.dataset is not Dataset.CIFAR10 or not spec.residual:
        raise ValueError(f"train takes a CIFAR-style ResNet (32x32 input), not {spec.name}")
    torch.manual_seed(request.seed)
    generator = torch.Generator().manual_seed(request.seed)
    config = model_config(request.name, spec, len(LABELS), "float32")
    digits = load_digits()
    train_x = torch.from_numpy(inputs(digits.train.pixels, config))
    train_y = torch.from_numpy(digits.train.labels)
    held_x = torch.from_numpy(inputs(digits.held_out.pixels, config))
    held_y = torch.from_numpy(digits.held_out.labels)

    options = BuildOptions(
        arch=spec.name,
        repo=request.repo,
        num_classes=len(LABELS),
        labels=LABELS,
        seed=request.seed,
        stochastic_depth=request.stochastic_depth,
    )
    model = create_model(spec.name, options)
    steps = -(-len(train_x) // request.batch_size)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=request.max_lr,
        momentum=0.9,
        nesterov=True,
        weight_decay=request.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=request.max_lr, epochs=request.epochs, steps_per_epoch=steps
    )
    loss_fn = nn.CrossEntropyLoss()
    started = time.perf_counter()
    held_accuracy = 0.0
    with tqdm(total=request.epochs * steps, desc="training", unit="batch", disable=None) as bar:
        for epoch in range(request.epochs):
            model.train()
            order = torch.randperm(len(train_x), generator=generator)
            for batch in order.split(request.batch_size):
                loss = loss_fn(model(_shift(train_x[batch], generator)), train_y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(
                    epoch=epoch + 1, loss=f"{loss.item():.3f}", held_out=f"{held_accuracy:.1%}"
                )
            held_accuracy = accuracy(model, held_x, held_y)
            bar.set_postfix(
                epoch=epoch + 1, loss=f"{loss.item():.3f}", held_out=f"{held_accuracy:.1%}"
            )
    train_seconds = time.perf_counter() - started

    out = Path(request.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / f"{request.name}.pth"
    torch.save(model.eval().state_dict(), checkpoint)
    write_pngs(digits.train, out / "train")
    write_pngs(digits.held_out, out / "held_out")
    versions = {}
    for precision in request.precisions:
        name = request.name if precision is Precision.FP32 else f"{request.name}_{precision}"
        calibration = out / "train" if precision is Precision.INT8 else None
        built = build(
            options.updated(
                name=name, weights=checkpoint, precision=precision, calibration=calibration
            )
        )
        versions[precision] = built.version_dir
    return TrainResult(checkpoint, held_accuracy, train_seconds, versions)


def predictions(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """Top-1 classes of the PyTorch model (eval mode) for preprocessed inputs."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(c).argmax(1) for c in torch.from_numpy(images).split(256)]).numpy()
