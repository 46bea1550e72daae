"""The SDK against a real `resnet-serve serve` on loopback, with the builder's model repository."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import resnet_serve_client as rsc
from PIL import Image

from tests.fixtures.servers import InProcessServer
from tests.shared_data import IMAGENET_CLASSES

MODELS = {"resnet18", "resnet18_u8", "cifar"}


@pytest.fixture(scope="module")
def client(model_server: InProcessServer) -> Iterator[rsc.Client]:
    with rsc.Client(model_server.address, model="resnet18") as client:
        yield client


def _scores(result: rsc.Classification) -> dict[int, float]:
    return {c.index: c.score for c in result.classes}


def test_classify_takes_paths_bytes_pil_and_arrays(client: rsc.Client, photos: Path) -> None:
    path = photos / "chelsea.png"
    pil = Image.open(path).convert("RGB")
    by_path, by_bytes, by_pil = client.classify([path, path.read_bytes(), pil], top_k=3)
    assert by_path.classes == by_bytes.classes
    assert [c.index for c in by_pil.classes] == [c.index for c in by_path.classes]
    assert (by_path.model, by_path.version) == ("resnet18", "1")
    names = IMAGENET_CLASSES.read_text().splitlines()
    for score in by_path.classes:
        assert 0 < score.score <= 1
        assert score.label == names[score.index]
    assert [c.score for c in by_path.classes] == sorted((c.score for c in by_path.classes),
                                                        reverse=True)
    hwc = np.asarray(pil)
    [by_u8] = client.classify(hwc, top_k=3)
    assert [c.index for c in by_u8.classes] == [c.index for c in by_path.classes]
    chw = np.random.default_rng(0).standard_normal((3, 224, 224)).astype(np.float32)
    [by_float] = client.classify(chw, top_k=1)
    assert len(by_float.classes) == 1


def test_a_batch_answers_in_order(client: rsc.Client, photos: Path) -> None:
    files = sorted(photos.glob("*.jpg"))
    batch = client.classify(files, top_k=1)
    one_by_one = [client.classify(f, top_k=1)[0] for f in files]
    assert [r.top.index for r in batch] == [r.top.index for r in one_by_one]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
def test_classify_many_keeps_input_order(client: rsc.Client, photos: Path, stream: bool) -> None:
    files = sorted(photos.iterdir()) * 3
    expected = {f: client.classify(f)[0].classes for f in set(files)}
    results = list(client.classify_many(files, concurrency=4, stream=stream))
    assert [r.classes for r in results] == [expected[f] for f in files]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
def test_classify_many_errors_keep_their_place(
    client: rsc.Client, photos: Path, tmp_path: Path, stream: bool
) -> None:
    good = photos / "rocket.jpg"
    images = [good, b"not an image", tmp_path / "missing.jpg", good]
    results = list(client.classify_many(images, stream=stream, return_exceptions=True))
    assert [type(r) for r in results] == [rsc.Classification, rsc.InvalidImage,
                                          FileNotFoundError, rsc.Classification]
    assert results[1].code.name == "INVALID_ARGUMENT"
    with pytest.raises(rsc.InvalidImage):
        list(client.classify_many(images, stream=stream))
    with pytest.raises(rsc.ModelNotFound):
        list(client.classify_many([good], model="nope", stream=stream))


def test_client_side_resize_gives_the_servers_own_result(
    model_server: InProcessServer, photos: Path
) -> None:
    files = sorted(photos.iterdir())
    with rsc.Client(model_server.address, model="resnet18") as plain:
        originals = plain.classify(files)
    for mode in ("uint8", "jpeg"):
        resize = rsc.Resize(mode)
        with rsc.Client(model_server.address, model="resnet18", resize=resize) as shrinking:
            shrunk = shrinking.classify(files)
        for original, result in zip(originals, shrunk, strict=True):
            if mode == "uint8":  # the very pixels the server would have made
                assert _scores(result) == pytest.approx(_scores(original), abs=1e-5)
            else:
                assert len(result.classes) == 5


def test_models_and_health(client: rsc.Client) -> None:
    models = {m.name: m for m in client.list_models()}
    assert set(models) == MODELS
    info = client.get_model("resnet18")
    assert info == models["resnet18"]
    assert (info.input.dtype, info.input.layout, info.input.shape) == ("float32", "NCHW",
                                                                         (-1, 3, 224, 224))
    assert models["resnet18_u8"].input.dtype == "uint8"
    assert models["cifar"].num_classes == 10
    assert [(v.version, v.state) for v in info.versions] == [("1", rsc.ModelState.READY)]
    assert client.health() is rsc.HealthStatus.SERVING
    assert client.health("cifar") is rsc.HealthStatus.SERVING


def test_the_real_servers_errors_are_typed(client: rsc.Client) -> None:
    with pytest.raises(rsc.InvalidImage, match=r"^INVALID_ARGUMENT: image 1: ") as caught:
        client.classify([_png(), b"not an image"])
    assert caught.value.message.startswith("image 1: ")
    with pytest.raises(rsc.ModelNotFound):
        client.classify(_png(), model="resnet9000")
    with pytest.raises(rsc.ModelNotFound):
        client.get_model("resnet9000")
    with pytest.raises(rsc.InvalidArgument) as caught:
        client.classify(_png(), top_k=5000)
    assert type(caught.value) is rsc.InvalidArgument
    with pytest.raises(rsc.InvalidImage):
        client.classify(np.zeros((3, 32, 32), np.float32))
    with pytest.raises(rsc.DeadlineExceeded):
        client.classify([_png()] * 8, timeout=0.001)


async def test_async_client(model_server: InProcessServer, photos: Path) -> None:
    files = sorted(photos.iterdir())
    async with rsc.AsyncClient(model_server.address, model="resnet18") as client:
        assert await client.health() is rsc.HealthStatus.SERVING
        assert {m.name for m in await client.list_models()} == MODELS
        assert (await client.get_model("cifar")).input.shape == (-1, 3, 32, 32)
        batch = await client.classify(files)
        streamed = [r async for r in client.classify_many(files, concurrency=3)]
        unary = [r async for r in client.classify_many(files, concurrency=3, stream=False)]
        with pytest.raises(rsc.ModelNotFound):
            await client.classify(files[0], model="nope")
    assert [r.classes for r in streamed] == [r.classes for r in batch]
    assert [r.classes for r in unary] == [r.classes for r in batch]


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()
