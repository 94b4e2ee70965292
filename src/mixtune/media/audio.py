"""Audio: decoding a file or a `data:` URI (PyAV) to mono float samples at the processor's sampling rate.

An audio reference is a path (wav, mp3, flac, ... anything FFmpeg reads) or a `data:audio/...;base64,` URI
(what an OpenAI `input_audio` part becomes). It is decoded lazily, in the loader workers, resampled to the
rate the model's feature extractor expects, and checked against `max_audio_seconds`: a longer clip is a bad
sample (never cut silently). The default limit is what the feature extractor itself reads (Whisper's 30 s),
since it would drop the rest without a word. Failures are DataErrors naming the audio, field "audios".
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass

import numpy as np

from mixtune.errors import ConfigError, DataError
from mixtune.media import import_av


@dataclass
class Audio:
    samples: np.ndarray  # (n,) float32 mono, in [-1, 1]
    rate: int
    source: str = ""

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.rate


@dataclass
class AudioBudget:
    rate: int = 16000  # the feature extractor's sampling rate
    max_seconds: float | None = None  # longer clips are bad samples


def check_audio_keys(values: dict, where: str) -> None:
    value = values.get("max_audio_seconds")
    if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
        raise ConfigError(f"expected a positive number (seconds), got {value!r}", key=f"{where}.max_audio_seconds")


def audio_budget(processor, max_seconds: float | None) -> AudioBudget | None:
    """The processor's sampling rate, and the entry's limit capped at what its feature extractor reads."""
    extractor = getattr(processor, "feature_extractor", None)
    if extractor is None:
        return None
    rate = int(getattr(extractor, "sampling_rate", 16000))
    readable = getattr(extractor, "n_samples", None)
    limit = readable / rate if readable else None
    if max_seconds is not None:
        limit = min(max_seconds, limit) if limit else max_seconds
    return AudioBudget(rate=rate, max_seconds=limit)


def load_audio(ref, budget: AudioBudget) -> Audio:
    """Decode, downmix and resample one audio reference; any failure is a DataError naming it."""
    if not isinstance(ref, str) or not ref:
        raise DataError(f"audio reference must be a non-empty string, got {ref!r}", field="audios")
    name = ref[:40] + "..." if ref.startswith("data:") else ref
    if ref.startswith("data:"):
        _, _, payload = ref.partition(",")
        try:
            source = io.BytesIO(base64.b64decode(payload, validate=True))
        except Exception:
            raise DataError(f"audio data URI is not valid base64: {name}", field="audios") from None
    else:
        if not os.path.exists(ref):
            raise DataError(f"audio not found: {ref}", field="audios")
        if os.path.getsize(ref) == 0:
            raise DataError(f"audio file is empty: {ref}", field="audios")
        source = ref
    samples = decode(source, budget.rate, name)
    audio = Audio(samples, budget.rate, name)
    if not len(samples):
        raise DataError(f"audio has no decodable samples: {name}", field="audios")
    if budget.max_seconds is not None and audio.seconds > budget.max_seconds + 1e-6:
        raise DataError(f"audio is {audio.seconds:.1f} s, over max_audio_seconds {budget.max_seconds:g} (the model's "
                        f"feature extractor reads no more): {name}", field="audios")
    return audio


def decode(source, rate: int, name: str) -> np.ndarray:
    av = import_av("audio", "audios")
    try:
        with av.open(source) as container:
            if not container.streams.audio:
                raise DataError(f"no audio stream in {name}", field="audios")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            chunks = []
            for frame in container.decode(container.streams.audio[0]):
                chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]  # flush
    except DataError:
        raise
    except Exception as e:  # PyAV raises InvalidDataError and friends for corrupt files
        raise DataError(f"cannot decode audio {name}: {type(e).__name__}: {e}", field="audios") from None
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


def processor_audio_inputs(processor, audios: list[Audio]) -> dict:
    """Keyword arguments giving a processor these decoded clips at the rate they were resampled to."""
    if not audios:
        return {}
    return {"audio": [a.samples for a in audios], "sampling_rate": audios[0].rate}
