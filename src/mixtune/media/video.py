"""Videos: decoding a file (PyAV) or a folder / list of frame images, sampling frames, fitting pixel budgets.

A video reference is a path (a video file or a folder of frame images) or a list of frame image paths. It is
decoded lazily, in the loader workers, into a `Video`: its sampled frames (RGB Pillow images) and the rate
they were sampled at. `VideoBudget` holds a dataset entry's controls: `fps` (frames kept per second of video),
`min_frames` / `max_frames`, and the per-frame and total pixel budgets (`video_max_pixels`,
`video_total_pixels`). Any failure becomes a DataError naming the video, like images' errors.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from PIL import Image

from mixtune.errors import ConfigError, DataError
from mixtune.media import import_av

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MIN_FRAME_SIDE = 28  # below this no vision encoder gets a useful patch
DEFAULT_FPS = 2.0
DEFAULT_MAX_FRAMES = 32
DEFAULT_MIN_FRAMES = 2
# dataset entry keys -> VideoBudget fields
VIDEO_KEYS = {"fps": "fps", "min_frames": "min_frames", "max_frames": "max_frames",
              "video_max_pixels": "max_pixels", "video_total_pixels": "total_pixels"}


def check_video_keys(values: dict, where: str) -> None:
    """A dataset entry's video keys: positive numbers, min_frames <= max_frames."""
    for key in VIDEO_KEYS:
        value = values.get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        if value is not None and not (number and (key == "fps" or isinstance(value, int))):
            expected = "a positive number" if key == "fps" else "a positive integer"
            raise ConfigError(f"expected {expected}, got {value!r}", key=f"{where}.{key}")
    low, high = values.get("min_frames") or DEFAULT_MIN_FRAMES, values.get("max_frames") or DEFAULT_MAX_FRAMES
    if low > high:
        raise ConfigError(f"min_frames ({low}) is above max_frames ({high})", key=where)


@dataclass
class Video:
    frames: list  # RGB Pillow images, all one size
    fps: float  # rate the frames were sampled at (frames per second of the source)
    source: str = ""
    total_frames: int = 0  # frames in the source
    indices: tuple = ()  # which source frames were kept

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the frames: what the downscale loop checks against the smallest side."""
        return self.frames[0].size

    def __len__(self) -> int:
        return len(self.frames)


@dataclass
class VideoBudget:
    fps: float = DEFAULT_FPS
    min_frames: int = DEFAULT_MIN_FRAMES
    max_frames: int = DEFAULT_MAX_FRAMES
    max_pixels: int | None = None  # per frame
    total_pixels: int | None = None  # over all kept frames

    @classmethod
    def from_entry(cls, values: dict) -> "VideoBudget":
        given = {field: values[key] for key, field in VIDEO_KEYS.items() if values.get(key) is not None}
        return cls(**given)

    def frame_count(self, total: int, duration: float | None) -> int:
        """Frames to keep from a source of `total` frames lasting `duration` seconds (None: a frame list): one
        per 1/fps seconds, within [min_frames, max_frames]; a source shorter than min_frames repeats frames."""
        wanted = min(total, round(duration * self.fps)) if duration is not None else total
        return max(1, min(self.max_frames, max(self.min_frames, wanted)))

    def fit(self, video: Video, scale: float = 1.0) -> Video:
        """The video within the pixel budgets, then shrunk to `scale` of its pixels (the `truncation: downscale`
        factor): first it loses frames (down to `min_frames`), then resolution."""
        keep = len(video.frames)
        if scale < 1.0:
            keep = max(min(self.min_frames, keep), math.floor(keep * scale))
        # `scale` is a fraction of the video's pixels over all frames (so of its tokens); what dropping frames
        # did not achieve comes off each frame's area
        area_scale = scale * len(video.frames) / keep
        indices = pick(len(video.frames), keep)
        frames = [video.frames[i] for i in indices]
        w, h = frames[0].size
        budget = w * h
        if self.max_pixels:
            budget = min(budget, self.max_pixels)
        if self.total_pixels:
            budget = min(budget, self.total_pixels // len(frames))
        factor = (budget / (w * h) * min(1.0, area_scale)) ** 0.5
        if factor < 1.0 - 1e-9:
            size = (max(1, round(w * factor)), max(1, round(h * factor)))
            frames = [f.resize(size, Image.Resampling.BICUBIC) for f in frames]
        fps = video.fps * keep / len(video.frames)
        return Video(frames, fps, video.source, video.total_frames,
                     tuple(video.indices[i] for i in indices) if video.indices else tuple(indices))


def pick(total: int, keep: int) -> list[int]:
    """`keep` indices spread evenly over `total` frames (the first always kept; repeated when keep > total)."""
    if keep == total:
        return list(range(total))
    return [math.floor(i * total / keep) for i in range(keep)]


def load_video(ref, budget: VideoBudget) -> Video:
    """Decode and sample one video reference; any failure is a DataError (field "videos") naming it."""
    name = ref if isinstance(ref, str) else f"[{len(ref)} frame images]" if isinstance(ref, list) else repr(ref)
    if isinstance(ref, list):
        return load_frame_list(ref, budget, name)
    if not isinstance(ref, str):
        raise DataError(f"video reference must be a path or a list of frame paths, got {type(ref).__name__}",
                        field="videos")
    if os.path.isdir(ref):
        frames = sorted(os.path.join(ref, f) for f in os.listdir(ref) if f.lower().endswith(FRAME_SUFFIXES))
        if not frames:
            raise DataError(f"video folder holds no frame images ({', '.join(FRAME_SUFFIXES)}): {ref}",
                            field="videos")
        return load_frame_list(frames, budget, ref)
    if not os.path.exists(ref):
        raise DataError(f"video not found: {ref}", field="videos")
    if os.path.getsize(ref) == 0:
        raise DataError(f"video file is empty: {ref}", field="videos")
    return decode_file(ref, budget)


def load_frame_list(paths: list, budget: VideoBudget, name: str) -> Video:
    """Frame images are a video at `budget.fps`: kept up to `max_frames`, spread evenly."""
    if not paths:
        raise DataError(f"video {name} has no frames", field="videos")
    indices = pick(len(paths), budget.frame_count(len(paths), None))
    frames = []
    for i in indices:
        path = paths[i]
        if not isinstance(path, str) or not os.path.exists(path):
            raise DataError(f"frame {i} of video {name} not found: {path}", field="videos")
        try:
            with Image.open(path) as img:
                frames.append(img.convert("RGB"))
        except Exception as e:  # PIL raises many types for corrupt files
            raise DataError(f"cannot decode frame {i} of video {name}: {type(e).__name__}: {e}",
                            field="videos") from None
    return Video(same_size(frames, name), budget.fps * len(indices) / len(paths), name, len(paths), tuple(indices))


def decode_file(path: str, budget: VideoBudget) -> Video:
    """Decode a video file with PyAV, keeping the frames nearest to `budget.fps` sample times."""
    av = import_av("video files", "videos")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise DataError(f"video file has no video stream: {path}", field="videos")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0) or None
            total = stream.frames  # from the container's header; 0 where it does not say
            # with a known count only the kept frames are converted to images (a long video is never held whole)
            sampled = pick(total, budget.frame_count(total, total / rate if rate else None)) if total else None
            wanted = set(sampled) if total else None
            decoded = {}
            for i, frame in enumerate(container.decode(stream)):
                if wanted is None or i in wanted:
                    decoded[i] = frame.to_image()
    except DataError:
        raise
    except Exception as e:  # PyAV raises InvalidDataError and friends for corrupt files
        raise DataError(f"cannot decode video {path}: {type(e).__name__}: {e}", field="videos") from None
    if not decoded:
        raise DataError(f"video has no decodable frames: {path}", field="videos")
    if wanted is None:  # no frame count in the header: all frames were decoded, pick from them
        count = len(decoded)
        indices = pick(count, budget.frame_count(count, count / rate if rate else None))
    else:  # a header count a frame or two above what decodes is common: keep the sampled ones that decoded
        count, indices = total, [i for i in sampled if i in decoded]
    duration = count / rate if rate else None
    sampled_fps = len(indices) / duration if duration else budget.fps
    return Video(same_size([decoded[i].convert("RGB") for i in indices], path), sampled_fps, path, count,
                 tuple(indices))


def same_size(frames: list, name: str) -> list:
    if len({f.size for f in frames}) > 1:
        raise DataError(f"frames of video {name} differ in size: {sorted({f.size for f in frames})}",
                        field="videos")
    if min(frames[0].size) < MIN_FRAME_SIDE:
        raise DataError(f"video {name} frames are {frames[0].size[0]}x{frames[0].size[1]}, under "
                        f"{MIN_FRAME_SIDE} pixels a side", field="videos")
    return frames


def processor_video_inputs(processor, videos: list[Video]) -> dict:
    """Keyword arguments that give a processor these decoded videos as they are: frames already sampled
    (`do_sample_frames: False`), their rate in `video_metadata` (Qwen3-VL writes timestamps from it, Qwen2.5-VL
    its temporal positions), and, for processors that size frames by pixel count (Qwen-VL), no minimum of their
    own: mixtune's budgets and `truncation: downscale` decide the frame size, the processor only rounds it to
    its patch grid (its own maximum still applies)."""
    if not videos:
        return {}
    from transformers.video_utils import VideoMetadata

    kwargs: dict = {"do_sample_frames": False}
    video_processor = getattr(processor, "video_processor", None)
    if "cap_pixels_per_frame" in getattr(getattr(type(video_processor), "valid_kwargs", None), "__annotations__", {}):
        kwargs["cap_pixels_per_frame"] = True  # qwen-vl-utils' rule, transformers' default from 5.22 on
    size = getattr(video_processor, "size", None)
    if size is not None and size.get("shortest_edge") is not None and size.get("longest_edge") is not None:
        kwargs["size"] = {"shortest_edge": 1, "longest_edge": size["longest_edge"]}
    metadata = [VideoMetadata(total_num_frames=len(v), fps=v.fps, frames_indices=list(range(len(v))),
                              width=v.size[0], height=v.size[1]) for v in videos]
    return {"videos": [v.frames for v in videos], "video_metadata": metadata, "videos_kwargs": kwargs}
