"""Tiny generated media for tests: videos written with PyAV, frame folders with Pillow, tones as wav.

A video shows a square moving across a grey background, so frames differ and a different video gives
different pixels."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

SIDE = 56


def moving_square(n_frames: int, direction: str = "right", side: int = SIDE, colour=(220, 30, 30)) -> list:
    """Frames (H, W, 3 uint8) of a square moving in `direction` (left, right, up, down)."""
    frames = []
    box = side // 4
    for t in range(n_frames):
        img = np.full((side, side, 3), 128, dtype=np.uint8)
        step = (side - box) * t // max(1, n_frames - 1)
        x, y = {"right": (step, side // 2 - box // 2), "left": (side - box - step, side // 2 - box // 2),
                "down": (side // 2 - box // 2, step), "up": (side // 2 - box // 2, side - box - step)}[direction]
        img[y:y + box, x:x + box] = colour
        frames.append(img)
    return frames


def write_video(path, frames: list, fps: int = 4) -> str:
    """An mp4 (mpeg4 codec: in every PyAV wheel) of the frames; returns the file name."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return os.path.basename(str(path))


def write_frame_folder(path, frames: list) -> str:
    os.makedirs(path, exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(os.path.join(path, f"{i:04d}.png"))
    return os.path.basename(str(path))


def write_tone(path, hz: float, seconds: float = 1.0, rate: int = 22050) -> str:
    """A sine tone as a 16-bit mono wav (the standard library's wave module); returns the file name."""
    import wave

    t = np.arange(int(seconds * rate)) / rate
    samples = (0.5 * np.sin(2 * np.pi * hz * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return os.path.basename(str(path))
