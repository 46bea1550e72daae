"""The JPEG inputs: real photos re-encoded at about one megapixel.

Each photo of ``/work/shared/data/photos`` (or any folder of JPEGs) is resized
to ~1 MP, aspect kept, and saved as a quality-90 JPEG, so the server decodes
what a phone camera's downscaled upload looks like.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image

DEFAULT_SOURCE = Path("/work/shared/data/photos")
MEGAPIXEL = 1_000_000
QUALITY = 90


def one_megapixel(source: Path, target: Path, *, pixels: int = MEGAPIXEL) -> list[Path]:
    """Write each JPEG of `source` resized to about `pixels` into `target`; reuses earlier ones."""
    sources = sorted(p for p in source.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not sources:
        raise FileNotFoundError(f"no JPEG photos in {source}")
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sources:
        out = target / f"{path.stem}-{pixels // 1000}k.jpg"
        if not out.exists():
            with Image.open(path) as image:
                rgb = image.convert("RGB")
                scale = math.sqrt(pixels / (rgb.width * rgb.height))
                size = (round(rgb.width * scale), round(rgb.height * scale))
                rgb.resize(size, Image.Resampling.LANCZOS).save(out, "JPEG", quality=QUALITY)
        written.append(out)
    return written
