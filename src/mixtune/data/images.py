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
SOURCE_SIZE = "mixtune_source_size"  # key in a decoded image's `info`: (width, height) of the file


def resolve_image_ref(ref: str, base_dir: str) -> str:
    """Paths are relative to the data file's folder; absolute paths and data: URIs pass through; `file://`
    is a local path. Every reader resolves through here, so they all refuse remote images alike."""
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"image reference must be a non-empty string, got {ref!r}")
    if ref.startswith(("http://", "https://")):
        raise ValueError(f"remote image {ref!r}: mixtune reads local files and data: URIs; download it first")
    if ref.startswith("file://"):
        ref = ref[len("file://"):]
    if ref.startswith(("data:", "hfrow:")) or os.path.isabs(ref):
        return ref
    return os.path.normpath(os.path.join(base_dir, ref))


def load_image(ref: str) -> Image.Image:
    """Decode one image to RGB; any failure becomes a DataError naming the image."""
    if not isinstance(ref, str):
        raise DataError(f"image reference must be a string, got {type(ref).__name__}", field="image")
    name = ref[:40] + "..." if ref.startswith("data:") else ref
    try:
        if ref.startswith("data:"):
            _, _, payload = ref.partition(",")
            data = base64.b64decode(payload, validate=False)
        elif ref.startswith("hfrow:"):  # image bytes inside a `datasets` arrow file (formats/hf.py)
            from mixtune.data.formats.hf import hf_image_bytes

            data = hf_image_bytes(ref)
        else:
            if not os.path.exists(ref):
                raise DataError(f"image not found: {ref}", field="image")
            if os.path.getsize(ref) == 0:
                raise DataError(f"image file is empty: {ref}", field="image")
            with open(ref, "rb") as f:
                data = f.read()
        if not data:
            raise DataError(f"image data is empty: {name}", field="image")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise DataError(f"image is too large ({img.width}x{img.height} pixels, limit "
                                f"{MAX_IMAGE_PIXELS}): {name}", field="image")
            img.load()
        rgb = img.convert("RGB")
        # grounding boxes are given in the file's own pixels; the size travels with the image through resizing
        rgb.info[SOURCE_SIZE] = img.size
        return rgb
    except DataError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise DataError(f"image is absurdly large (decompression bomb): {name}: {e}", field="image") from None
    except Exception as e:  # PIL raises many types for corrupt files
        raise DataError(f"cannot decode image {name}: {type(e).__name__}: {e}", field="image") from None


def fit_image(img: Image.Image, min_pixels: int | None = None, max_pixels: int | None = None,
              scale: float = 1.0) -> Image.Image:
    """Resize keeping the aspect ratio so the pixel count lies in [min_pixels, max_pixels], then by `scale`
    (the `truncation: downscale` factor); `min_pixels` stays a floor."""
    w, h = img.size
    area = w * h
    factor = 1.0
    if max_pixels and area > max_pixels:
        factor = (max_pixels / area) ** 0.5
    elif min_pixels and area < min_pixels:
        factor = (min_pixels / area) ** 0.5
    factor *= scale
    if min_pixels and area * factor * factor < min_pixels:
        factor = (min_pixels / area) ** 0.5
    if abs(factor - 1.0) < 1e-9:
        return img
    out = img.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.BICUBIC)
    out.info[SOURCE_SIZE] = source_size(img)
    return out


def source_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of the image file before mixtune resized it."""
    return tuple(img.info.get(SOURCE_SIZE, img.size))
