"""`mixtune demo --task text_to_audio`: a tiny AudioLDM2 pipeline learns to make a tone whose pitch follows the
caption ("... low tone" -> 1 kHz, "... high tone" -> 5 kHz), trained through `mixtune train`'s own path.

A real AudioLDM2 checkpoint comes with a trained VAE and vocoder; the tiny pipeline's are random, and a random
vocoder does not turn a spectrogram into its pitch. So the demo first fits the tiny VAE (log-mel autoencoder)
and vocoder (log-mel -> waveform, by the log-mel distance of its output) on tones across the band: stand-ins
for the pretrained parts, fitted without captions. Only then does the task run, training the UNet alone on
captioned tones. The measure is the dominant frequency (FFT peak) of each generated waveform: a clip matches
when it lies nearer the caption's pitch than the other's. Held-out prompts are captions whose wording the
training never showed (unseen adjective + pitch pairs), each generated from its own noise seed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time

import numpy as np
import torch

LOW_HZ, HIGH_HZ = 1000.0, 5000.0
TRAIN_WORDS = ("soft", "loud", "steady", "pure", "clear")
HELD_OUT_WORDS = ("short", "long", "quiet")
HELD_OUT_PER_CAPTION = 4  # noise seeds per held-out caption


def captions(words, pitch: str) -> list[str]:
    return [f"a {w} {pitch} tone" for w in words] + ([f"a {pitch} tone"] if words is TRAIN_WORDS else [])


def tone(freq: float, n: int, rate: int, rng: random.Random) -> np.ndarray:
    t = np.arange(n) / rate
    return (rng.uniform(0.3, 0.8) * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))).astype(np.float32)


def make_tone_data(root: str, n_train: int, rate: int, n_samples: int, seed: int = 0) -> dict:
    from mixtune.tasks.text_to_audio import write_wav

    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "clips"), exist_ok=True)
    records = []
    for i in range(n_train):
        pitch = ("low", "high")[i % 2]
        caption = rng.choice(captions(TRAIN_WORDS, pitch))
        name = f"clips/{i:04d}.wav"
        write_wav(os.path.join(root, name), tone(LOW_HZ if pitch == "low" else HIGH_HZ, n_samples, rate, rng), rate)
        records.append({"audio": name, "caption": caption})
    held = []
    for i, pitch in enumerate(("low", "high")):
        for j, caption in enumerate(captions(HELD_OUT_WORDS, pitch)):
            name = f"clips/eval_{pitch}_{j}.wav"
            write_wav(os.path.join(root, name), tone(LOW_HZ if pitch == "low" else HIGH_HZ, n_samples, rate, rng),
                      rate)
            held.append({"audio": name, "caption": caption})
    for split, rows in (("train", records), ("eval", held)):
        with open(os.path.join(root, f"{split}.jsonl"), "w") as f:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"train": len(records), "eval": len(held)}


def fit_vae_and_vocoder(pipeline, steps: int = 300, seed: int = 0) -> dict:
    """Fit the tiny VAE and vocoder on tones of random pitch (no captions): the pretrained parts' stand-ins."""
    from mixtune.models.audioldm2 import log_mel, mel_settings, segment_frames

    torch.manual_seed(seed)
    rng = random.Random(seed)
    settings = mel_settings(pipeline.vocoder.config)
    n = segment_frames(pipeline) * settings["hop"]

    def batch(k=16):
        waves = torch.from_numpy(np.stack([tone(rng.uniform(300, 7500), n, settings["rate"], rng) for _ in range(k)]))
        return waves, torch.stack([log_mel(w, settings)[None] for w in waves])

    def log_spectrum(waves):  # a finer linear-frequency view than the mel bins: pins the pitch, not just its band
        window = torch.hann_window(128)
        return torch.log(torch.stft(waves, 128, 32, window=window, return_complex=True).abs() + 1e-5)

    vae, vocoder = pipeline.vae, pipeline.vocoder
    vae.train(), vocoder.train()
    opt = torch.optim.Adam([*vae.parameters(), *vocoder.parameters()], lr=3e-3)
    first = last = None
    for step in range(steps):
        waves, mel = batch()
        dist = vae.encode(mel).latent_dist
        rec = vae.decode(dist.sample()).sample
        vae_loss = torch.nn.functional.mse_loss(rec, mel) + 1e-6 * dist.kl().mean()
        wave = vocoder(mel[:, 0])  # (B, n)
        wave_mel = torch.stack([log_mel(w, settings, soft_floor=True) for w in wave])
        voc_loss = torch.nn.functional.l1_loss(wave_mel, mel[:, 0]) + \
            torch.nn.functional.l1_loss(log_spectrum(wave), log_spectrum(waves))
        loss = vae_loss + voc_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if first is None:
            first = (vae_loss.item(), voc_loss.item())
        last = (vae_loss.item(), voc_loss.item())
    vae.eval(), vocoder.eval()
    for p in [*vae.parameters(), *vocoder.parameters()]:
        p.requires_grad_(True)
    return {"vae_loss": [round(first[0], 4), round(last[0], 4)], "vocoder_mel_l1": [round(first[1], 4),
                                                                                   round(last[1], 4)]}


def dominant_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    spectrum[0] = 0.0
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[int(spectrum.argmax())])


def pitch_accuracy(pipeline, prompts: list[tuple[str, int]], steps: int) -> dict:
    """Share of prompts whose generated clip's dominant frequency is nearer the caption's pitch."""
    from mixtune.tasks.text_to_audio import generate

    rate = pipeline.vocoder.config.sampling_rate
    caps = [c for c, _ in prompts]
    waves = np.concatenate([generate(pipeline, [c], seed=s, steps=steps) for c, s in prompts])
    hz = [dominant_hz(w, rate) for w in waves]
    right = [abs(f - LOW_HZ) < abs(f - HIGH_HZ) if "low" in c else abs(f - HIGH_HZ) < abs(f - LOW_HZ)
             for c, f in zip(caps, hz)]
    return {"accuracy": float(np.mean(right)), "dominant_hz": [round(f) for f in hz]}


def held_out_prompts() -> list[tuple[str, int]]:
    return [(c, 100 + k) for pitch in ("low", "high") for c in captions(HELD_OUT_WORDS, pitch)
            for k in range(HELD_OUT_PER_CAPTION)]


def run_audio_demo(output_dir: str, overrides: dict | None = None, n_train: int = 256, fit_steps: int = 300,
                   inference_steps: int = 20) -> dict:
    from mixtune.config import build_config
    from mixtune.models.audioldm2 import build_tiny_pipeline, load_pipeline, mel_settings, segment_frames
    from mixtune.train.run import train

    torch.manual_seed(0)
    shutil.rmtree(output_dir, ignore_errors=True)
    timings = {}
    start = time.time()
    pipeline = build_tiny_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    parts = fit_vae_and_vocoder(pipeline, fit_steps)
    base = os.path.join(output_dir, "tiny_pipeline")
    pipeline.save_pretrained(base)
    timings["fit_vae_vocoder_s"] = round(time.time() - start, 1)
    settings = mel_settings(pipeline.vocoder.config)
    data = os.path.join(output_dir, "data")
    counts = make_tone_data(data, n_train, settings["rate"], segment_frames(pipeline) * settings["hop"])
    prompts = held_out_prompts()
    start = time.time()
    before = pitch_accuracy(load_pipeline(base), prompts, inference_steps)
    timings["measure_s"] = round(time.time() - start, 1)
    raw = {"model_name_or_path": base, "output_dir": os.path.join(output_dir, "trained"),
           "dataset": {"train": [{"name": "audio_captions", "data_files": "train.jsonl"}],
                       "eval": [{"name": "audio_captions", "data_files": "eval.jsonl"}]},
           "per_device_train_batch_size": 16, "learning_rate": 2e-3, "num_train_epochs": 30,
           "lr_scheduler_type": "cosine", "warmup_ratio": 0.05, "weight_decay": 0.0, "logging_steps": 16,
           "save_strategy": "no", "eval_strategy": "no", "seed": 0, "dataloader_num_workers": 0,
           "disable_tqdm": True, **(overrides or {})}
    start = time.time()
    metrics = train(build_config(raw, data))
    timings["train_s"] = round(time.time() - start, 1)
    after = pitch_accuracy(load_pipeline(raw["output_dir"]), prompts, inference_steps)
    with open(os.path.join(raw["output_dir"], "metrics.json")) as f:
        history = json.load(f).get("log_history", [])
    curve = [(h["step"], round(h["loss"], 4)) for h in history if "loss" in h]
    return {"task": "text_to_audio", "family": "audioldm2", "data": counts, "held_out_prompts": len(prompts),
            "pitch_accuracy_before": before["accuracy"], "pitch_accuracy_after": after["accuracy"],
            "dominant_hz_before": before["dominant_hz"], "dominant_hz_after": after["dominant_hz"],
            "eval_loss": metrics.get("eval_loss"), "loss_curve": curve, "tiny_parts_fit": parts,
            "seconds": timings, "model": raw["output_dir"]}
