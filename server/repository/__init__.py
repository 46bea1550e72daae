"""The model repository contract: what the builder writes and the server reads.

Layout (Triton's, with JSON instead of pbtxt)::

    <repo>/<name>/config.json                   ModelConfig (config.py), with the version
                                                policy saying which versions serve
    <repo>/<name>/labels.txt                    one class name per line (labels.py)
    <repo>/<name>/<version>/model.onnx          the graph ONNX Runtime runs
    <repo>/<name>/<version>/verification.json   Verification (verification.py): the builder's
                                                checks and the sha256 of model.onnx

``<version>`` is a positive integer in ASCII digits (layout.py); other entries of a model
directory are not versions. A version is served only if `check_version` (check.py) says
so: its files inside the repository (no link out), both files present, the record passed
and its sha256 matches. Images become model
inputs by `transform` (transform.py), in the server and in the builder alike.
Typed options objects become command-line flags by one rule, `flags` (flags.py), which
``resnet-serve serve`` (the server's Settings) and ``resnet-serve build`` (the builder's
BuildOptions) share.

This package imports only the standard library, pydantic, numpy and Pillow: no grpc, no
ONNX Runtime, nothing else of the server. The builder, the bench and the tests reach the
server's rules through it alone.
"""

from server.repository.check import Status, VersionCheck, check_version
from server.repository.config import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SERVE_ALL,
    AllVersions,
    Batching,
    CudaOptions,
    InputSpec,
    Instances,
    LatestVersions,
    ModelConfig,
    Optimization,
    OutputSpec,
    Preprocessing,
    SpecificVersions,
    TensorRT,
    VersionPolicy,
)
from server.repository.labels import labels_text, read_labels
from server.repository.layout import (
    CONFIG_FILE,
    LABELS_FILE,
    MODEL_FILE,
    VERIFICATION_FILE,
    is_model_name,
    is_version_name,
    latest_version,
    model_dirs,
    version_dirs,
    versions,
)
from server.repository.transform import (
    ImageError,
    ImageLimits,
    crop_only,
    prepare_encoded,
    prepare_pixels,
    transform,
)
from server.repository.verification import (
    Agreement,
    CheckRecord,
    Verification,
    sha256_file,
    top1_agreement,
)

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "CONFIG_FILE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LABELS_FILE",
    "MODEL_FILE",
    "SERVE_ALL",
    "VERIFICATION_FILE",
    "Agreement",
    "AllVersions",
    "Batching",
    "CheckRecord",
    "CudaOptions",
    "ImageError",
    "ImageLimits",
    "InputSpec",
    "Instances",
    "LatestVersions",
    "ModelConfig",
    "Optimization",
    "OutputSpec",
    "Preprocessing",
    "SpecificVersions",
    "Status",
    "TensorRT",
    "Verification",
    "VersionCheck",
    "VersionPolicy",
    "check_version",
    "crop_only",
    "is_model_name",
    "is_version_name",
    "labels_text",
    "latest_version",
    "model_dirs",
    "prepare_encoded",
    "prepare_pixels",
    "read_labels",
    "sha256_file",
    "top1_agreement",
    "transform",
    "version_dirs",
    "versions",
]
