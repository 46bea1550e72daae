"""Requests of both APIs, one call helper, and answers reduced to comparable numbers.

``classify(...)`` builds a ``resnet_serve.v1`` ClassifyRequest, ``infer(...)``
an Open Inference Protocol v2 ModelInferRequest (tritonclient's own messages,
so the v2 cases also prove wire compatibility). ``call(channel, request)``
sends either and returns ``(code, details, answer)``. `OpenStream` holds a
ClassifyStream open: a call the server counts for as long as it lasts.
"""

from __future__ import annotations

import queue
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
from resnet_serve_client import bytes_tensor
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2 as pb
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2_grpc as pb_grpc
from tritonclient.grpc import service_pb2 as v2
from tritonclient.grpc import service_pb2_grpc as v2_grpc

Request = pb.ClassifyRequest | v2.ModelInferRequest
CALL_TIMEOUT = 60.0


class OpenStream:
    """A ClassifyStream kept open: `request` answered once, then held until `close()`."""

    def __init__(self, channel: grpc.Channel, request: pb.ClassifyRequest) -> None:
        self._request = request
        self._requests: queue.Queue[pb.ClassifyRequest | None] = queue.Queue()
        stub = pb_grpc.ClassifierStub(channel)
        self._responses = stub.ClassifyStream(iter(self._requests.get, None),
                                              timeout=CALL_TIMEOUT)  # fmt: skip
        self.send()  # once answered, the server is answering it: the call is counted

    def send(self) -> None:
        """One more message, answered."""
        self._requests.put(self._request)
        answer = next(self._responses)
        assert answer.WhichOneof("result") == "response", answer

    def close(self) -> None:
        """Half-close and read to the end (the stream's error, if it ended with one)."""
        self._requests.put(None)
        assert list(self._responses) == []


def classify(model: str, *images: bytes | pb.Image, **fields: Any) -> pb.ClassifyRequest:
    wrapped = [i if isinstance(i, pb.Image) else pb.Image(encoded=i) for i in images]
    return pb.ClassifyRequest(model=model, images=wrapped, **fields)


def float_image(chw: np.ndarray) -> pb.Image:
    tensor = pb.Tensor(dtype=pb.Tensor.FLOAT32, shape=chw.shape, data=chw.astype("<f4").tobytes())
    return pb.Image(tensor=tensor)


def uint8_image(shape: Sequence[int], data: bytes | None = None) -> pb.Image:
    data = bytes(int(np.prod(shape))) if data is None else data
    return pb.Image(tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=shape, data=data))


def infer(
    model: str,
    *,
    datatype: str,
    shape: Sequence[int],
    raw: bytes,
    name: str = "images",
    version: str = "",
    outputs: Sequence[v2.ModelInferRequest.InferRequestedOutputTensor] = (),
) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name=name, datatype=datatype, shape=list(shape))
    request.raw_input_contents.append(raw)
    request.outputs.extend(outputs)
    return request


def infer_images(model: str, *images: bytes, **options: Any) -> v2.ModelInferRequest:
    return infer(model, datatype="BYTES", shape=[len(images)], raw=bytes_tensor.serialize(images),
                 **options)  # fmt: skip


def infer_floats(model: str, batch: np.ndarray, **options: Any) -> v2.ModelInferRequest:
    return infer(model, datatype="FP32", shape=batch.shape, raw=batch.astype("<f4").tobytes(),
                 **options)  # fmt: skip


def output(name: str = "logits") -> v2.ModelInferRequest.InferRequestedOutputTensor:
    return v2.ModelInferRequest.InferRequestedOutputTensor(name=name)


def classification(k: int) -> v2.ModelInferRequest.InferRequestedOutputTensor:
    requested = output()
    requested.parameters["classification"].int64_param = k
    return requested


def call(channel: grpc.Channel, request: Request) -> tuple[grpc.StatusCode, str, Any]:
    """Send a request of either API; the status code, its details and the response (or None)."""
    if isinstance(request, pb.ClassifyRequest):
        method = pb_grpc.ClassifierStub(channel).Classify
    else:
        method = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
    try:
        return grpc.StatusCode.OK, "", method(request, timeout=CALL_TIMEOUT)
    except grpc.RpcError as error:
        return error.code(), error.details() or "", None


def answer(response: Any) -> np.ndarray:
    """Top-5 (index, score) rows of a ClassifyResponse, or the logits of a v2 response."""
    if isinstance(response, pb.ClassifyResponse):
        return np.array([[(c.index, c.score) for c in r.classes] for r in response.results])
    output = response.outputs[0]
    assert output.datatype == "FP32", output.datatype
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(output.shape))


def answered(response: Any) -> int:
    """How many images a successful response answers."""
    if isinstance(response, pb.ClassifyResponse):
        return len(response.results)
    return int(response.outputs[0].shape[0])
