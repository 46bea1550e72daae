"""The v2 protocol over HTTP/REST: the real tritonclient.http, curl-like raw requests, and the
image ``classify`` route, against one in-process server (``model_server``: resnet18,
resnet18_u8, cifar). The gRPC port of the same server is the reference: both answer alike.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.fixtures.servers import InProcessServer
from tests.shared_data import PHOTOS

JPEGS = [PHOTOS / "chelsea.jpg", PHOTOS / "coffee.jpg"]


@pytest.fixture(scope="module")
def client(model_server: InProcessServer) -> Iterator[httpclient.InferenceServerClient]:
    assert model_server.http_url is not None
    triton = httpclient.InferenceServerClient(model_server.http_url.removeprefix("http://"))
    yield triton
    triton.close()


@pytest.fixture(scope="module")
def grpc_client(model_server: InProcessServer) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(model_server.address) as triton:
        yield triton


def normalized(batch: int, size: int = 224, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size), dtype=np.float32)


def http_input(array: np.ndarray, datatype: str, binary: bool = True) -> httpclient.InferInput:
    tensor = httpclient.InferInput("images", list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def grpc_logits(client: grpcclient.InferenceServerClient, model: str, array: np.ndarray) -> Any:
    datatype = "BYTES" if array.dtype == np.object_ else "FP32"
    tensor = grpcclient.InferInput("images", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return client.infer(model, [tensor]).as_numpy("logits")


def jpegs() -> np.ndarray:
    return np.array([p.read_bytes() for p in JPEGS], dtype=np.object_)


def call(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None, method: str = ""
) -> tuple[int, dict[str, str], bytes]:
    """One raw request, as curl would send it: (status, headers, body), errors included."""
    request = urllib.request.Request(url, data=body, headers=headers or {})
    if method:
        request.method = method
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


# health and metadata


def test_live_ready_and_model_ready(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("resnet18")
    assert client.is_model_ready("resnet18", "1")
    assert not client.is_model_ready("resnet18", "99")
    assert not client.is_model_ready("no_such_model")


def test_health_bodies_are_kserves(model_server: InProcessServer) -> None:
    """KServe's SDK (InferenceRESTClient, protocol v2) reads the JSON body of the health
    routes, as KServe's server writes it; Triton's clients read only the status."""
    base = model_server.http_url
    assert call(f"{base}/v2/health/live")[::2] == (200, b'{"live":true}')
    assert call(f"{base}/v2/health/ready")[::2] == (200, b'{"ready":true}')
    for path in ("/v2/models/resnet18/ready", "/v2/models/resnet18/versions/1/ready"):
        status, headers, body = call(base + path)
        assert (status, json.loads(body)) == (200, {"name": "resnet18", "ready": True})
        assert headers["Content-Type"].startswith("application/json")
    status, _, body = call(f"{base}/v2/models/resnet18/versions/99/ready")
    assert status == 404 and "error" in json.loads(body)


def test_metadata_matches_grpc(
    client: httpclient.InferenceServerClient, grpc_client: grpcclient.InferenceServerClient
) -> None:
    server = client.get_server_metadata()
    assert server["name"] == "resnet-serve"
    assert set(server["extensions"]) == {
        "classification", "model_configuration", "statistics", "logging",
        "system_shared_memory",
    }  # fmt: skip
    metadata = client.get_model_metadata("resnet18")
    assert metadata == {
        "name": "resnet18",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}],
        "parameters": {"weights": "random (seed 0)"},
    }
    u8 = client.get_model_metadata("resnet18_u8", "1")
    assert u8["inputs"][0]["shape"] == [-1, 224, 224, 3]
    config = client.get_model_config("resnet18")
    reference = grpc_client.get_model_config("resnet18", as_json=True)["config"]
    assert config["name"] == reference["name"] == "resnet18"
    assert config["input"][0]["dims"] == [3, 224, 224]
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["input"][0]["format"] == "FORMAT_NCHW"
    assert config["output"][0]["label_filename"] == "labels.txt"
    assert config["max_batch_size"] == int(reference["max_batch_size"])


def test_repository_index(client: httpclient.InferenceServerClient) -> None:
    index = client.get_model_repository_index()
    assert [(m["name"], m["version"], m["state"]) for m in index] == [
        ("cifar", "1", "READY"),
        ("resnet18", "1", "READY"),
        ("resnet18_u8", "1", "READY"),
    ]


# inference


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_fp32_logits_equal_grpc(
    client: httpclient.InferenceServerClient,
    grpc_client: grpcclient.InferenceServerClient,
    binary: bool,
) -> None:
    batch = normalized(2, size=32, seed=1)
    outputs = [httpclient.InferRequestedOutput("logits", binary_data=binary)]
    result = client.infer(
        "cifar", [http_input(batch, "FP32", binary)], outputs=outputs, request_id="h1"
    )
    logits = result.as_numpy("logits")
    assert logits.dtype == np.float32 and logits.shape == (2, 10)
    response = result.get_response()
    assert (response["id"], response["model_name"], response["model_version"]) == (
        "h1",
        "cifar",
        "1",
    )
    np.testing.assert_allclose(logits, grpc_logits(grpc_client, "cifar", batch), rtol=1e-5)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_encoded_images_and_uint8(
    client: httpclient.InferenceServerClient,
    grpc_client: grpcclient.InferenceServerClient,
    binary: bool,
) -> None:
    # encoded images travel in binary only: JSON strings are UTF-8 text
    logits = client.infer("resnet18", [http_input(jpegs(), "BYTES")]).as_numpy("logits")
    np.testing.assert_allclose(logits, grpc_logits(grpc_client, "resnet18", jpegs()), rtol=1e-4)
    pixels = np.random.default_rng(2).integers(0, 255, (1, 224, 224, 3), dtype=np.uint8)
    u8 = client.infer("resnet18_u8", [http_input(pixels, "UINT8", binary)]).as_numpy("logits")
    assert u8.shape == (1, 1000)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_classification_extension(
    client: httpclient.InferenceServerClient,
    grpc_client: grpcclient.InferenceServerClient,
    model_repo: Path,
    binary: bool,
) -> None:
    outputs = [httpclient.InferRequestedOutput("logits", binary_data=binary, class_count=3)]
    result = client.infer("resnet18", [http_input(jpegs(), "BYTES")], outputs=outputs)
    classes = result.as_numpy("logits")
    assert classes.shape == (len(JPEGS), 3)
    assert result.get_output("logits")["datatype"] == "BYTES"
    reference = grpc_client.infer(
        "resnet18",
        [_grpc_bytes(jpegs())],
        outputs=[grpcclient.InferRequestedOutput("logits", class_count=3)],
    ).as_numpy("logits")
    labels = (model_repo / "resnet18" / "labels.txt").read_text().splitlines()
    for row, expected in zip(classes, reference, strict=True):
        texts = [e.decode() if isinstance(e, bytes) else e for e in row]
        assert texts == [e.decode() for e in expected]
        assert texts[0].split(":", 2)[2] in labels


def _grpc_bytes(array: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("images", list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


def test_compressed_request_and_response(client: httpclient.InferenceServerClient) -> None:
    batch = normalized(1, size=32, seed=3)
    plain = client.infer("cifar", [http_input(batch, "FP32")]).as_numpy("logits")
    for algorithm in ("gzip", "deflate"):
        result = client.infer(
            "cifar",
            [http_input(batch, "FP32")],
            request_compression_algorithm=algorithm,
            response_compression_algorithm=algorithm,
        )
        np.testing.assert_array_equal(result.as_numpy("logits"), plain)


def test_statistics_count_http_requests(client: httpclient.InferenceServerClient) -> None:
    def successes() -> int:
        [stats] = client.get_inference_statistics("cifar", "1")["model_stats"]
        return stats["inference_stats"]["success"]["count"]

    before = successes()
    client.infer("cifar", [http_input(normalized(1, size=32), "FP32")])
    assert successes() == before + 1
    every = client.get_inference_statistics()["model_stats"]
    assert {s["name"] for s in every} == {"resnet18", "resnet18_u8", "cifar"}
    assert isinstance(every[0]["inference_stats"]["queue"]["ns"], int)


# errors: 400 with the reason, 404 for unknown models


def _error(call: Callable[[], object]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def test_unknown_model_is_404(client: httpclient.InferenceServerClient) -> None:
    error = _error(lambda: client.infer("nope", [http_input(normalized(1), "FP32")]))
    assert error.status() == "404" and "unknown model 'nope'" in error.message()
    assert _error(lambda: client.get_model_metadata("resnet18", "99")).status() == "404"


def test_wrong_datatype_and_shape_are_400(client: httpclient.InferenceServerClient) -> None:
    wrong_type = normalized(1, size=32).astype(np.float64)
    error = _error(lambda: client.infer("cifar", [http_input(wrong_type, "FP64")]))
    assert error.status() == "400" and "input 'images' is FP64" in error.message()
    error = _error(lambda: client.infer("cifar", [http_input(normalized(1), "FP32")]))
    assert error.status() == "400" and "takes input of shape" in error.message()


CIFAR_SHAPE = [1, 3, 32, 32]


def body(data: object, shape: list[int] = CIFAR_SHAPE, **more: object) -> bytes:
    tensor = {"name": "images", "datatype": "FP32", "shape": shape, "data": data}
    return json.dumps({"inputs": [tensor], **more}).encode()


BINARY_HEADER = (
    b'{"inputs":[{"name":"images","datatype":"FP32","shape":[1,3,32,32],'
    b'"parameters":{"binary_data_size":12288}}]}'
)
BAD_BODIES = [
    (b"{not json", {}, "not valid JSON"),
    (b"[]", {}, "must be a JSON object"),
    (b'{"inputs": []}', {}, "takes exactly one input"),
    (
        BINARY_HEADER,
        {"Inference-Header-Content-Length": "500"},
        "Inference-Header-Content-Length is 500 but the body has",
    ),
    (BINARY_HEADER, {}, "declares 12288 bytes of binary data"),
    (body(["a"] * 3072), {}, "is FP32 but its 'data' holds strings"),
    (body([1, 2]), {}, "has shape [1, 3, 32, 32] (3072 elements) but 'data' holds 2"),
    (body([1, 2], shape=[1, 2]), {}, "takes input of shape [-1, 3, 32, 32]"),
    (
        b'{"inputs":[{"name":"images","datatype":"FLOAT","shape":[1],"data":[1]}]}',
        {},
        "unknown datatype 'FLOAT'",
    ),
    (
        body([0] * 3072, outputs=[{"name": "logits", "parameters": {"classification": "3"}}]),
        {},
        "parameter 'classification' must be an integer",
    ),
]


@pytest.mark.parametrize(("body", "headers", "reason"), BAD_BODIES)
def test_bad_bodies_are_400_with_the_reason(
    model_server: InProcessServer, body: bytes, headers: dict[str, str], reason: str
) -> None:
    status, response_headers, answer = call(
        f"{model_server.http_url}/v2/models/cifar/infer", body, headers
    )
    assert status == 400, answer
    assert response_headers["Content-Type"].startswith("application/json")
    assert reason in json.loads(answer)["error"]


def test_unknown_route_and_method_are_json_errors(model_server: InProcessServer) -> None:
    status, _, body = call(f"{model_server.http_url}/v2/nothing/here")
    assert status == 404 and "error" in json.loads(body)
    status, headers, body = call(f"{model_server.http_url}/v2/models/cifar/infer", method="GET")
    assert status == 405 and "POST" in headers["Allow"] and "error" in json.loads(body)


# the image route, as curl sends it


@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_classify_route_takes_the_file_as_body(
    model_server: InProcessServer,
    grpc_client: grpcclient.InferenceServerClient,
    model_repo: Path,
    method: str,
) -> None:
    status, headers, body = call(
        f"{model_server.http_url}/v2/models/resnet18/classify?top_k=3",
        JPEGS[0].read_bytes(),
        {"Content-Type": "image/jpeg", "X-Request-ID": "curl-1"},
        method,
    )
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    answer = json.loads(body)
    assert (answer["model"], answer["version"], answer["request_id"]) == ("resnet18", "1", "curl-1")
    [result] = answer["results"]
    assert len(result["classes"]) == 3
    logits = grpc_logits(grpc_client, "resnet18", jpegs()[:1])[0]
    assert [c["index"] for c in result["classes"]] == list(np.argsort(-logits)[:3])
    labels = (model_repo / "resnet18" / "labels.txt").read_text().splitlines()
    assert [c["label"] for c in result["classes"]] == [
        labels[c["index"]] for c in result["classes"]
    ]
    assert all(0 < c["score"] <= 1 for c in result["classes"])


def test_classify_route_versions_forms_and_errors(model_server: InProcessServer) -> None:
    base = f"{model_server.http_url}/v2/models/resnet18"
    status, _, body = call(f"{base}/versions/1/classify", JPEGS[1].read_bytes())
    assert status == 200 and len(json.loads(body)["results"][0]["classes"]) == 5
    boundary = "b0undary"
    form = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{p.name}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n".encode()
            + p.read_bytes()
            + b"\r\n"
            for p in JPEGS
        )
        + f"--{boundary}--\r\n".encode()
    )
    status, _, body = call(
        f"{base}/classify", form, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert status == 200 and len(json.loads(body)["results"]) == 2
    for url, data, reason in (
        (f"{base}/classify", b"", "the body is empty"),
        (f"{base}/classify", b"not an image", "image 0"),
        (f"{base}/classify?top_k=0", JPEGS[0].read_bytes(), "top_k is 0"),
        (f"{base}/classify?top_k=x", JPEGS[0].read_bytes(), "top_k is 'x'"),
    ):
        status, _, body = call(url, data, method="POST")
        assert status == 400 and reason in json.loads(body)["error"], body
    status, _, body = call(f"{model_server.http_url}/v2/models/nope/classify", b"x")
    assert status == 404


def test_non_finite_inputs_are_computed_by_default(
    client: httpclient.InferenceServerClient, grpc_client: grpcclient.InferenceServerClient
) -> None:
    """As Triton does (perf_analyzer's random data holds NaN and Inf); --reject-non-finite
    refuses them (tests/reliability/catalogue.py)."""
    batch = normalized(1, size=32, seed=7)
    batch[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    over_http = client.infer("cifar", [http_input(batch, "FP32")]).as_numpy("logits")
    over_grpc = grpc_logits(grpc_client, "cifar", batch)
    assert over_http.shape == over_grpc.shape == (1, 10)
    np.testing.assert_array_equal(np.isnan(over_http), np.isnan(over_grpc))


def test_random_weights_are_said_everywhere_a_user_looks(
    client: httpclient.InferenceServerClient,
    grpc_client: grpcclient.InferenceServerClient,
    model_server: InProcessServer,
) -> None:
    """The fixture's models have seeded random weights: v2 metadata (HTTP), the model
    configuration (both protocols) and the server's log say so."""
    assert client.get_model_metadata("cifar")["parameters"] == {"weights": "random (seed 0)"}
    config = client.get_model_config("cifar")
    assert config["parameters"]["weights"] == {"string_value": "random (seed 0)"}
    grpc_config = grpc_client.get_model_config("cifar").config
    assert grpc_config.parameters["weights"].string_value == "random (seed 0)"
    log = model_server.log()
    assert "model cifar version 1 READY in" in log and "weights: random (seed 0)" in log
    assert "model cifar version 1 has RANDOM weights (random (seed 0))" in log
