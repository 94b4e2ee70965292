"""The text_to_audio task: AudioLDM2 (a diffusers pipeline folder) fine-tuned on captioned audio clips.

What trains: the UNet, fully or through LoRA adapters (peft) on its attention projections; the text encoders
(CLAP, T5), projection model, GPT-2, VAE and vocoder stay frozen unless `freeze_include` is given, which then
alone says what is frozen. The loss is the pipeline's own diffusion objective: each clip's log-mel spectrogram
(the vocoder's rate, hop and mel bins; models/audioldm2.py) through the VAE to latents, noised by the pipeline's
scheduler at a random training timestep, and the UNet's prediction of the scheduler's `prediction_type` target
(the noise for `epsilon`, the velocity for `v_prediction`), conditioned as `AudioLDM2Pipeline.encode_prompt`
conditions it, with mean squared error.

Clips are decoded lazily (media/audio.py), downmixed to mono and resampled to the vocoder's rate, then cut or
padded with silence to the pipeline's segment (its UNet sample size x VAE scale, in spectrogram frames; the
first cut clip is logged). A clip that does not decode, is empty, silent, or has more than two channels is a
bad sample (file, sample, field 'audio'): under `on_bad_sample: skip` every clip is decoded once before training
and bad ones are skipped and counted; under `error` decoding stays lazy and the first bad clip stops the run.

Saves: a full run writes a diffusers folder `AudioLDM2Pipeline.from_pretrained` loads (the trained UNet with
the untouched parts); a LoRA run writes a peft adapter folder keyed on the UNet, which
`models.audioldm2.load_unet_adapter(pipeline, folder)` (= `PeftModel.from_pretrained(pipeline.unet, folder)`)
puts into a loaded pipeline. Evaluation reports the loss at fixed noise; with `eval_with_do_generation` it also
generates each held-out caption into `<output_dir>/eval_audio/step-N/*.wav` and reports the mean CLAP
text-audio cosine similarity (the pipeline's own CLAP text encoder, or a given CLAP checkpoint).
"""

from __future__ import annotations

import io
import json
import logging
import os
import wave
from dataclasses import dataclass

import numpy as np
import torch

from mixtune.errors import ConfigError, DataError
from mixtune.tasks import TaskData
from mixtune.tasks.samples import build_sample_split, eval_argument
from mixtune.train.trainer import MixTrainer

log = logging.getLogger("mixtune")
SILENCE_PEAK = 1e-4  # -80 dBFS: nothing a caption could describe
MAX_CHANNELS = 2  # mono or stereo (downmixed); more is a surround mix, not what AudioLDM2 was trained on
EVAL_SEED = 1234  # eval loss at the same noise and timesteps every time: comparable between evaluations


def load(mix, family):
    from mixtune.models.audioldm2 import AudioLDM2ForTraining, load_pipeline

    # load_pipeline names the pip command when diffusers is missing
    model = AudioLDM2ForTraining(load_pipeline(mix.model_name_or_path))
    if not mix.freeze_include:  # the default: only the UNet trains
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("unet."))
    model.prompt_cache = {}  # the text side is frozen: each caption's conditioning is computed once
    return model, None


def read_captions(entry, bad):
    from mixtune.data.formats import get_reader

    return get_reader(entry.name)(entry, bad)


def audio_channels(source) -> int:
    from mixtune.media import import_av

    av = import_av("audio", "audio")
    with av.open(source) as container:
        return container.streams.audio[0].channels if container.streams.audio else 0


def decode_clip(ref: str, rate: int) -> np.ndarray:
    """Mono float samples at `rate`; DataErrors carry the reason (the caller adds where)."""
    from mixtune.data.formats.audio_captions import HF_AUDIO, hf_audio_cell
    from mixtune.media.audio import AudioBudget, decode, load_audio

    if ref.startswith(HF_AUDIO):
        data, path = hf_audio_cell(ref)
        if not data and path and os.path.exists(path):
            ref = path
        elif not data:
            raise DataError(f"the audio cell holds no bytes and no readable path ({path!r})")
        else:
            channels = _channels_or_error(io.BytesIO(data), ref)
            samples = decode(io.BytesIO(data), rate, ref)
            return _checked(samples, channels, ref)
    if not ref.startswith("data:") and os.path.isfile(ref) and os.path.getsize(ref) > 0:
        channels = _channels_or_error(ref, ref)
    else:
        channels = 1  # load_audio names the missing / empty file or the bad data URI
    return _checked(load_audio(ref, AudioBudget(rate=rate)).samples, channels, ref)


def _channels_or_error(source, name: str) -> int:
    try:
        return audio_channels(source)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot decode audio {name}: {type(e).__name__}: {e}") from None


def _checked(samples: np.ndarray, channels: int, name: str) -> np.ndarray:
    if channels > MAX_CHANNELS:
        raise DataError(f"audio has {channels} channels; text_to_audio takes mono or stereo clips: {name}")
    if not len(samples):
        raise DataError(f"audio has no decodable samples: {name}")
    peak = float(np.abs(samples).max())
    if peak < SILENCE_PEAK:
        raise DataError(f"audio is silent (peak {peak:.1e}): {name}")
    return samples


@dataclass
class ClipPrep:
    """Audio reference -> log-mel spectrogram of the pipeline's segment (picklable for loader workers)."""
    settings: dict  # models.audioldm2.mel_settings
    frames: int
    warned_cut: bool = False  # the first clip cut to the segment is logged (once per loader process)

    def decode(self, sample) -> np.ndarray:
        try:
            return decode_clip(sample.audio, self.settings["rate"])
        except DataError as e:
            raise DataError(e.reason, file=sample.file, index=sample.index, line=sample.line, field="audio") from None

    def __call__(self, sample) -> dict:
        from mixtune.models.audioldm2 import log_mel

        samples = self.decode(sample)
        n = self.frames * self.settings["hop"]
        if len(samples) > n:
            if not self.warned_cut:
                self.warned_cut = True
                log.warning("clips longer than the model's %.2f s segment are cut to it (first: %s sample %s)",
                            n / self.settings["rate"], sample.file, sample.index)
            samples = samples[:n]
        samples = np.pad(samples, (0, n - len(samples)))
        return {"mel": log_mel(torch.from_numpy(samples), self.settings)[None], "caption": sample.caption}


def screened_reader(prep: ClipPrep):
    """The entry's samples; under `on_bad_sample: skip` every clip is decoded once here, so that a bad one is a
    counted skip before training (under `error` decoding stays lazy and the first bad clip stops the run)."""
    def read(entry, bad):
        samples = read_captions(entry, bad)
        if bad.policy != "skip":
            return samples
        kept = []
        for sample in samples:
            with bad.catch():
                prep.decode(sample)
                kept.append(sample)
        return kept
    return read


def collate(batch: list[dict]) -> dict:
    return {"mel": torch.stack([b["mel"] for b in batch]), "captions": [b["caption"] for b in batch]}


def build_data(config, family, model, processor) -> TaskData:
    from mixtune.models.audioldm2 import mel_settings, segment_frames

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prep = ClipPrep(mel_settings(base.vocoder.config), segment_frames(base.pipeline))
    read = screened_reader(prep)
    train = build_sample_split(config, "train", read, prep, "text_to_audio", reads="text_to_audio")
    if train is None:
        raise ConfigError("has no entries", key="dataset.train")
    evals = build_sample_split(config, "eval", read, prep, "text_to_audio", reads="text_to_audio")
    seconds = prep.frames * prep.settings["hop"] / prep.settings["rate"]
    log.info("train clips per epoch: %d, eval clips: %d; each clip: %.2f s at %d Hz (cut or padded), %d x %d log-mel",
             len(train), len(evals) if evals else 0, seconds, prep.settings["rate"], prep.frames,
             prep.settings["n_mels"])
    captions = sorted({s.caption for part in evals.parts for s in part.samples}) if evals is not None else []
    return TaskData(train=train, eval=eval_argument(evals), collator=collate, trainer_class=TextToAudioTrainer,
                    skipped=train.skipped + (evals.skipped if evals is not None else []),
                    trainer_attrs={"eval_captions": captions if config.mix.eval_with_do_generation else [],
                                   "base_path": config.mix.model_name_or_path})


# --- generation, WAV files and CLAP similarity --------------------------------------------------------------
def write_wav(path: str, samples: np.ndarray, rate: int) -> None:
    """16-bit PCM mono (the standard library's wave module: no extra dependency)."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(path, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return samples
    from mixtune.media import import_av

    av = import_av("audio", "audio")
    frame = av.AudioFrame.from_ndarray(samples.astype(np.float32)[None], format="flt", layout="mono")
    frame.sample_rate = rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target)
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


@torch.no_grad()
def generate(pipeline, captions: list[str], seed: int = 0, steps: int = 10, guidance_scale: float = 1.0,
             batch_size: int = 8) -> np.ndarray:
    """Waveforms (len(captions), samples) at the vocoder's rate; each caption's noise from seed + its index."""
    out = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start:start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        audio = pipeline(chunk, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
                         output_type="np").audios
        out.append(np.asarray(audio, dtype=np.float32))
    return np.concatenate(out)


@torch.no_grad()
def clap_similarity(captions: list[str], audio: np.ndarray, rate: int, clap=None) -> list[float]:
    """Cosine similarity of each caption's and its clip's CLAP embeddings. `clap`: (ClapModel, ClapProcessor-like
    with .tokenizer and .feature_extractor), or a pipeline (its own CLAP text encoder, tokenizer, extractor)."""
    if hasattr(clap, "text_encoder"):
        model, tokenizer, extractor = clap.text_encoder, clap.tokenizer, clap.feature_extractor
    else:
        model, processor = clap
        tokenizer, extractor = processor.tokenizer, processor.feature_extractor
    text = tokenizer(captions, padding=True, return_tensors="pt")
    clips = [resample(a, rate, extractor.sampling_rate) for a in audio]
    feats = extractor(clips, sampling_rate=extractor.sampling_rate, return_tensors="pt")
    t = _features(model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"]))
    a = _features(model.get_audio_features(input_features=feats["input_features"].to(model.dtype),
                                           is_longer=feats.get("is_longer")))
    return torch.nn.functional.cosine_similarity(t.float(), a.float(), dim=-1).tolist()


def _features(out):
    return out.pooler_output if hasattr(out, "pooler_output") else out  # transformers 5 returns a model output


def load_clap(path: str):
    from transformers import ClapModel, ClapProcessor

    return ClapModel.from_pretrained(path).eval(), ClapProcessor.from_pretrained(path)


def generation_eval(pipeline, captions: list[str], out_dir: str, seed: int = 0, steps: int = 10,
                    clap=None) -> dict[str, float]:
    """Generate each caption, write `<i>.wav` and `captions.jsonl` into out_dir; the mean CLAP similarity."""
    audio = generate(pipeline, captions, seed=seed, steps=steps)
    rate = pipeline.vocoder.config.sampling_rate
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "captions.jsonl"), "w", encoding="utf-8") as f:
        for i, (caption, clip) in enumerate(zip(captions, audio)):
            write_wav(os.path.join(out_dir, f"{i:04d}.wav"), clip, rate)
            f.write(json.dumps({"audio": f"{i:04d}.wav", "caption": caption}) + "\n")
    scores = clap_similarity(captions, audio, rate, clap if clap is not None else pipeline)
    return {"clap_similarity": float(np.mean(scores)), "generated": len(captions)}


# --- the trainer ---------------------------------------------------------------------------------------------
def unet_adapter_state(peft_model) -> tuple[dict, object]:
    """The LoRA weights and config keyed on the UNet alone (what `PeftModel.from_pretrained(unet, ...)` reads)."""
    import copy
    import re

    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    outside = [k for k in state if not k.startswith("base_model.model.unet.")]
    if outside:
        raise ConfigError(f"LoRA on AudioLDM2 trains the UNet; adapters outside it ({outside[0]}, ...) cannot be "
                          "saved as a UNet adapter", key="lora_target_modules")
    config = copy.deepcopy(peft_model.peft_config["default"])
    config.target_modules = re.sub(r"(^|\|)unet\\\.", r"\1", config.target_modules)
    if config.modules_to_save:
        config.modules_to_save = [m.removeprefix("unet.") for m in config.modules_to_save]
    return {"base_model.model." + k[len("base_model.model.unet."):]: v for k, v in state.items()}, config


class TextToAudioTrainer(MixTrainer):
    eval_captions: list[str] = []  # held-out captions generated at each evaluation (eval_with_do_generation)
    base_path: str | None = None  # the pipeline folder a LoRA adapter belongs to
    clap = None  # (ClapModel, ClapProcessor) for the similarity; None: the pipeline's own CLAP
    generation_steps = 10

    def _inner(self):
        model = self.accelerator.unwrap_model(self.model)
        return model, (model.get_base_model() if hasattr(model, "get_base_model") else model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = model(mel=inputs["mel"], captions=inputs["captions"])["loss"]
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        generator = torch.Generator(device=inputs["mel"].device).manual_seed(EVAL_SEED)
        with torch.no_grad():
            loss = model(mel=inputs["mel"], captions=inputs["captions"], generator=generator)["loss"]
        return loss.detach(), None, None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if eval_dataset is None and self.eval_captions and self.args.should_save:
            _, inner = self._inner()
            out_dir = os.path.join(self.args.output_dir, "eval_audio", f"step-{self.state.global_step}")
            was_training = inner.training
            inner.eval()
            scores = generation_eval(inner.pipeline, self.eval_captions, out_dir, seed=self.args.seed,
                                     steps=self.generation_steps, clap=self.clap)
            inner.train(was_training)
            scores = {f"{metric_key_prefix}_{k}": v for k, v in scores.items()}
            self.log(scores)
            metrics.update(scores)
        return metrics

    def _save(self, output_dir: str | None = None, state_dict=None):
        from safetensors.torch import save_file

        output_dir = output_dir or self.args.output_dir
        model, inner = self._inner()
        os.makedirs(output_dir, exist_ok=True)
        if hasattr(model, "get_base_model"):  # LoRA: a peft folder keyed on the UNet
            state, config = unet_adapter_state(model)
            config.base_model_name_or_path = self.base_path
            config.save_pretrained(output_dir)
            save_file({k: v.detach().contiguous() for k, v in state.items()},
                      os.path.join(output_dir, "adapter_model.safetensors"))
        else:
            inner.pipeline.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from safetensors.torch import load_file

        model, inner = self._inner()
        if hasattr(model, "get_base_model"):
            from peft import set_peft_model_state_dict

            state = load_file(os.path.join(resume_from_checkpoint, "adapter_model.safetensors"))
            state = {"base_model.model.unet." + k[len("base_model.model."):]: v for k, v in state.items()}
            result = set_peft_model_state_dict(model, state)
            if getattr(result, "unexpected_keys", None):
                raise RuntimeError(f"adapter keys that fit no module: {result.unexpected_keys[:3]}")
            return
        path = os.path.join(resume_from_checkpoint, "unet", "diffusion_pytorch_model.safetensors")
        inner.unet.load_state_dict(load_file(path), strict=True)
