"""What the adapters share, so none imports another: the classify answer (v1 gRPC and
HTTP ``classify`` both send ``ClassifyResponse``, HTTP as JSON) and the checks of a
model-control request (v2 gRPC and HTTP load/unload)."""

from __future__ import annotations

from collections.abc import Iterable

from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2 as pb

from server.errors import InvalidInput
from server.postprocess import top_k
from server.request_path import Result

# Triton's flag for ensembles on unload; this server has none, so there are no dependents.
UNLOAD_PARAMETERS = ("unload_dependents",)


def classify_response(result: Result) -> pb.ClassifyResponse:
    """The top ``result.checked.top_k`` classes of each image, best first, with labels."""
    indices, scores = top_k(result.logits, result.checked.top_k)
    labels = result.served.labels
    response = pb.ClassifyResponse(
        model=result.served.name, version=result.served.version, request_id=result.request_id
    )
    for row_i, row_s in zip(indices.tolist(), scores.tolist(), strict=True):
        classes = response.results.add().classes  # filled in place: no message per class
        for i, s in zip(row_i, row_s, strict=True):
            classes.add(index=i, label=labels[i], score=s)
    return response


def check_control(
    model_name: str, repository_name: str, parameters: Iterable[str], known: tuple[str, ...]
) -> None:
    """A load or unload request (gRPC or HTTP) names a model, no other repository, and only
    the parameters `known`."""
    if not model_name:
        raise InvalidInput("model_name is empty; RepositoryIndex lists the models")
    if repository_name:
        raise InvalidInput(
            f"repository_name is {repository_name!r}; this server has one "
            "repository: leave it empty"
        )
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        allowed = ", ".join(known) or "none"
        raise InvalidInput(f"parameters {unknown} are not supported; allowed: {allowed}")
