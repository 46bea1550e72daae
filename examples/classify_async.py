"""Classify photos with the SDK's asyncio client, ``AsyncClient``.

    python examples/classify_async.py --server localhost:8001 --model resnet50 cat.jpg dog.png

The same output as classify.py: ``<photo>: <label> (<index>) <score>``, best first.
Create the client inside the running event loop (here: inside ``asyncio.run``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from resnet_serve_client import AsyncClient, ResnetServeError


async def classify(server: str, model: str, photos: list[str], top_k: int) -> None:
    async with AsyncClient(server, model=model) as client:
        # one request for the first photo ...
        [first] = await client.classify(photos[0], top_k=top_k)
        results = [first]
        # ... and the rest over one stream, in order, at most 16 in flight
        async for result in client.classify_many(photos[1:], top_k=top_k, concurrency=16):
            results.append(result)
    for photo, result in zip(photos, results, strict=True):
        for c in result.classes:
            print(f"{photo}: {c.label} ({c.index}) {c.score:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="localhost:8001", help="gRPC address")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("photos", nargs="+", help="image files (JPEG, PNG, WebP, BMP, GIF)")
    args = parser.parse_args(argv)
    try:
        asyncio.run(classify(args.server, args.model, args.photos, args.top_k))
    except ResnetServeError as error:
        print(f"failed: {error.code.name}: {error.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
