"""Image references: resolving them against the data file, and decoding them in loader workers."""

from __future__ import annotations

import base64
import io
import os
import warnings

import numpy as np
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
        rgb = to_rgb(img)
        # grounding boxes are given in the file's own pixels; the size travels with the image through resizing
        rgb.info[SOURCE_SIZE] = img.size
        return rgb
    except DataError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise DataError(f"image is absurdly large (decompression bomb): {name}: {e}", field="image") from None
    except Exception as e:  # PIL raises many types for corrupt files
        raise DataError(f"cannot decode image {name}: {type(e).__name__}: {e}", field="image") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, brightness kept. Pillow's own convert("RGB") clips 16-bit and 32-bit
    values to 255 (a 16-bit PNG turns almost white) and drops transparency to whatever colour lies under it;
    here high-bit-depth images are scaled to 0-255 and transparency is composited onto white, as
    transformers' `convert_to_rgb` does. CMYK, palette, 1-bit, YCbCr, LA go through Pillow."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(img), sixteen_bit=img.mode.startswith("I;16")
                                         or (img.mode == "I" and img.format == "PNG"))).convert("RGB")
    if "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _to_uint8(values: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    """Grey levels of any range to 0-255: 16-bit by its full scale, floats in [0, 1] by 255, values already
    in 0-255 as they are, anything else stretched from its own minimum to its maximum."""
    values = values.astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if sixteen_bit or (low >= 0 and 255 < high <= 65535 and np.all(values == np.round(values))):
        scaled = values / 257.0
    elif low >= 0 and high <= 1.0 and not np.all(values == np.round(values)):
        scaled = values * 255.0
    elif low >= 0 and high <= 255:
        scaled = values
    else:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


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
