"""Classify photos with the Python SDK (``pip install ./clients/python``).

    python examples/classify.py --server localhost:8001 --model resnet50 cat.jpg dog.png

One line per class, best first: ``<photo>: <label> (<index>) <score>``. The photos go
over one ``ClassifyStream`` call, at most ``--concurrency`` in flight, and come back in
the order given; ``client.classify(path)`` is the one-request form.
"""

from __future__ import annotations

import argparse
import sys

from resnet_serve_client import Client, ResnetServeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="localhost:8001", help="gRPC address")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("photos", nargs="+", help="image files (JPEG, PNG, WebP, BMP, GIF)")
    args = parser.parse_args(argv)

    with Client(args.server, model=args.model) as client:
        try:
            results = client.classify_many(
                args.photos, top_k=args.top_k, concurrency=args.concurrency
            )
            for photo, result in zip(args.photos, results, strict=True):
                for c in result.classes:
                    print(f"{photo}: {c.label} ({c.index}) {c.score:.4f}")
        except ResnetServeError as error:  # keeps the gRPC code and the server's message
            print(f"failed: {error.code.name}: {error.message}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
