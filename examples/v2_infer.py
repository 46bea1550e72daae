"""Classify photos through the Open Inference Protocol v2 with Triton's own client.

    python examples/v2_infer.py --url localhost:8001 --model resnet50 cat.jpg dog.png
    python examples/v2_infer.py --url localhost:8000 --protocol http --model resnet50 cat.jpg

``tritonclient[grpc,http]`` talks to this server as to Triton. The photos go as one BYTES
tensor ``images`` [N] of encoded files, which the server decodes and preprocesses as it
does for ``Classify``; the classification extension (``class_count``) returns the top
classes of each image as ``b"<logit>:<index>:<label>"``. Output:
``<photo>: <label> (<index>) <logit>``, best first.

To send the graph's own tensor instead (FP32 [N, 3, 224, 224], already normalized, or
UINT8 [N, 224, 224, 3] for a model built with ``--input uint8``) and get the raw logits
[N, classes], give an ``InferInput("images", shape, "FP32")`` and request ``logits``
without ``class_count``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="localhost:8001", help="host:port of the server")
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--classes", type=int, default=3, help="top classes per photo")
    parser.add_argument("photos", nargs="+", help="image files (JPEG, PNG, WebP, BMP, GIF)")
    args = parser.parse_args(argv)
    triton = grpcclient if args.protocol == "grpc" else httpclient

    client = triton.InferenceServerClient(args.url)
    try:
        if not client.is_model_ready(args.model):
            print(f"failed: model {args.model} is not ready", file=sys.stderr)
            return 1
        photos = np.array([Path(p).read_bytes() for p in args.photos], dtype=np.object_)
        images = triton.InferInput("images", [len(photos)], "BYTES")
        images.set_data_from_numpy(photos)
        top = triton.InferRequestedOutput("logits", class_count=args.classes)
        result = client.infer(args.model, [images], outputs=[top])
    except InferenceServerException as error:
        print(f"failed: {error}", file=sys.stderr)
        return 1
    finally:
        client.close()
    for photo, row in zip(args.photos, result.as_numpy("logits"), strict=True):
        for entry in row:
            text = entry.decode() if isinstance(entry, bytes) else str(entry)
            logit, index, label = text.split(":", 2)
            print(f"{photo}: {label} ({index}) {float(logit):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
