"""Classify photos over HTTP with the standard library (no SDK, no gRPC).

    python examples/http_classify.py --url http://localhost:8000 --model resnet50 cat.jpg

Each photo's bytes are the body of ``POST /v2/models/<model>/classify?top_k=K``; the
answer is ``Classify``'s as JSON. The same with curl:

    curl --data-binary @cat.jpg 'localhost:8000/v2/models/resnet50/classify?top_k=3'

Output: ``<photo>: <label> (<index>) <score>``, best first.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path


def classify(url: str, model: str, photo: str, top_k: int) -> dict:
    request = urllib.request.Request(
        f"{url.rstrip('/')}/v2/models/{model}/classify?top_k={top_k}",
        data=Path(photo).read_bytes(),
        headers={"Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://localhost:8000", help="the HTTP port's URL")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("photos", nargs="+", help="image files (JPEG, PNG, WebP, BMP, GIF)")
    args = parser.parse_args(argv)

    for photo in args.photos:
        try:
            answer = classify(args.url, args.model, photo, args.top_k)
        except urllib.error.HTTPError as error:  # 400, 401, 404, 503 (Retry-After), 504
            print(f"failed: {error.code}: {json.load(error)['error']}", file=sys.stderr)
            return 1
        for c in answer["results"][0]["classes"]:
            print(f"{photo}: {c['label']} ({c['index']}) {c['score']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
