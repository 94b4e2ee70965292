"""Image references: resolving them against the data file, and decoding them in loader workers."""

from __future__ import annotations

import base64
import io
import os
import warnings

from PIL import Image

from mixtune.errors import DataError

# Pillow's own default bomb limit is about 89 MP and only warns; a training image this large is an error.
MAX_IMAGE_PIXELS = 64_000_000


def resolve_image_ref(ref: str, base_dir: str) -> str:
    """Paths are relative to the data file's folder; absolute paths and data: URIs pass through."""
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"image reference must be a non-empty string, got {ref!r}")
    if ref.startswith("data:") or os.path.isabs(ref):
        return ref
    return os.path.normpath(os.path.join(base_dir, ref))


def load_image(ref: str) -> Image.Image:
    """Decode one image to RGB; any failure becomes a DataError naming the image."""
    name = ref[:40] + "..." if ref.startswith("data:") else ref
    try:
        if ref.startswith("data:"):
            _, _, payload = ref.partition(",")
            data = base64.b64decode(payload, validate=False)
        else:
            if not os.path.exists(ref):
                raise DataError(f"image not found: {ref}", field="image")
            if os.path.getsize(ref) == 0:
                raise DataError(f"image file is empty: {ref}", field="image")
            with open(ref, "rb") as f:
                data = f.read()
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise DataError(f"image is too large ({img.width}x{img.height} pixels, limit "
                                f"{MAX_IMAGE_PIXELS}): {name}", field="image")
            img.load()
        return img.convert("RGB")
    except DataError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise DataError(f"image is absurdly large (decompression bomb): {name}: {e}", field="image") from None
    except Exception as e:  # PIL raises many types for corrupt files
        raise DataError(f"cannot decode image {name}: {type(e).__name__}: {e}", field="image") from None
