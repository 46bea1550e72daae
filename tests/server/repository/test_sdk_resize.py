"""The SDK's client-side resize repeats the transform's geometry; this pins the two together.

The SDK installs without the server and the contract imports no grpc (the SDK's package
does), so neither can import the other: resizing a PIL image on the client with
``Resize("uint8")`` must give exactly the pixels the server's transform makes when it
resizes to the same shorter side and crops the same square.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from resnet_serve_client import Resize

from server.repository import InputSpec, ModelConfig, Preprocessing, transform

SQUARE = ModelConfig(
    name="square",
    arch="resnet18",
    num_classes=1,
    input=InputSpec(dtype="uint8", layout="NHWC", size=256),
    preprocessing=Preprocessing(resize=256, crop=256),
)


@pytest.mark.parametrize("size", [(640, 427), (427, 640), (301, 1000), (100, 50), (256, 300)])
def test_uint8_resize_is_the_servers_resize_and_crop(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    tensor = Resize("uint8", size=256).pil(image).tensor
    sent = np.frombuffer(tensor.data, np.uint8).reshape(tuple(tensor.shape))
    np.testing.assert_array_equal(sent, transform(image, SQUARE))
