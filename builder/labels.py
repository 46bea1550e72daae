"""Class names for a model's ``labels.txt``: ImageNet-1k, CIFAR-10, or ``class_i``."""

from __future__ import annotations

from importlib import resources

from builder.architectures import ArchSpec, Dataset

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k names in class-index order, shipped as package data."""
    text = (
        resources.files("builder").joinpath("data/imagenet_classes.txt").read_text(encoding="utf-8")
    )
    return text.splitlines()


def labels_for(spec: ArchSpec, num_classes: int) -> list[str]:
    """The dataset's names for the row's default head, ``class_<i>`` for any other head."""
    if num_classes == spec.default_num_classes:
        if spec.dataset is Dataset.IMAGENET:
            return imagenet_classes()
        return list(CIFAR10_CLASSES)
    return [f"class_{i}" for i in range(num_classes)]
