"""Where the shared, read-only test data lives (ImageNet class names, real photos).

`RESNET_SERVE_SHARED_DATA` names it explicitly; otherwise `../shared/data`
beside the checkout, then `/work/shared/data`.
"""

from __future__ import annotations

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]


def _find() -> Path:
    candidates = [
        os.environ.get("RESNET_SERVE_SHARED_DATA"),
        _REPO.parent / "shared" / "data",
        "/work/shared/data",
    ]
    for candidate in filter(None, candidates):
        if (Path(candidate) / "photos").is_dir():
            return Path(candidate)
    raise RuntimeError(
        "shared test data not found; set RESNET_SERVE_SHARED_DATA to the folder that holds "
        f"photos/ and imagenet_classes.txt (looked in {[c for c in candidates if c]})"
    )


SHARED_DATA = _find()
PHOTOS = SHARED_DATA / "photos"
IMAGENET_CLASSES = SHARED_DATA / "imagenet_classes.txt"
