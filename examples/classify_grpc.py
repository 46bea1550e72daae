"""Call ``resnet_serve.v1.Classifier/Classify`` with the generated gRPC stubs alone.

    python examples/classify_grpc.py --server localhost:8001 --model resnet50 cat.jpg

What the SDK does underneath, without its retries, typed errors or image handling: the
stubs ship in ``resnet_serve_client.proto`` (any language can generate its own from
``protos/``). Output: ``<photo>: <label> (<index>) <score>``, best first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2 as pb
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="localhost:8001", help="gRPC address")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("photos", nargs="+", help="image files (JPEG, PNG, WebP, BMP, GIF)")
    args = parser.parse_args(argv)

    request = pb.ClassifyRequest(
        model=args.model,
        top_k=args.top_k,
        images=[pb.Image(encoded=Path(photo).read_bytes()) for photo in args.photos],
    )
    with grpc.insecure_channel(args.server) as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        try:
            response = stub.Classify(request, timeout=30)
        except grpc.RpcError as error:
            print(f"failed: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    for photo, result in zip(args.photos, response.results, strict=True):
        for c in result.classes:
            print(f"{photo}: {c.label} ({c.index}) {c.score:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
