"""`mixtune demo --task text_to_audio`: a tiny AudioLDM2 pipeline learns to make a tone whose pitch follows the
caption ("... low tone" -> 1 kHz, "... high tone" -> 5 kHz), trained through `mixtune train`'s own path.

A real AudioLDM2 checkpoint comes with a trained VAE and vocoder; the tiny pipeline's are random, and a random
vocoder does not turn a spectrogram into its pitch. So the demo first makes stand-ins for the pretrained parts,
without captions: the tiny VAE is fitted as a log-mel autoencoder on tones, and the tiny vocoder's weights are
written (not learned) as a two-tone synthesiser that voices the 1 kHz and 5 kHz mel bins' energy as those sines
(fitting it by gradient, with mel and linear-spectrum losses, left it voicing near-DC or 4 kHz whatever the
input after 300-600 steps). Only then does the task run, training the UNet alone on captioned tones. The
measure is the dominant frequency (FFT peak) of each generated waveform: a clip matches when it lies nearer the
caption's pitch than the other's. Held-out prompts are captions whose wording the
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


def fit_vae(pipeline, steps: int = 300, seed: int = 0) -> dict:
    """Fit the tiny VAE as a log-mel autoencoder on tones of random pitch (no captions)."""
    from mixtune.models.audioldm2 import log_mel, mel_settings, segment_frames

    torch.manual_seed(seed)
    rng = random.Random(seed)
    settings = mel_settings(pipeline.vocoder.config)
    n = segment_frames(pipeline) * settings["hop"]
    vae = pipeline.vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    curve = []
    for step in range(steps):
        waves = [tone(rng.choice((LOW_HZ, HIGH_HZ, rng.uniform(300, 7500))), n, settings["rate"], rng)
                 for _ in range(16)]
        mel = torch.stack([log_mel(torch.from_numpy(w), settings)[None] for w in waves])
        dist = vae.encode(mel).latent_dist
        loss = torch.nn.functional.mse_loss(vae.decode(dist.sample()).sample, mel) + 1e-6 * dist.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(loss.item())
    vae.eval()
    return {"vae_mse_first": round(curve[0], 3), "vae_mse_last10": round(float(np.mean(curve[-10:])), 4)}


@torch.no_grad()
def voice_two_tones(pipeline, scale: float = 0.04) -> dict:
    """Write the tiny vocoder's weights as a two-tone synthesiser: the energy of the mel bin where a 1 kHz tone
    peaks voices a 1 kHz sine, that of a 5 kHz tone's bin a 5 kHz sine. Needs hop 16 at 16 kHz (both tones
    repeat every 16 samples), two 4x upsamplers (kernel 8) and 16 initial channels: the tiny pipeline's sizes.

    conv_pre puts each bin's shifted log energy (>= 0) in channels 0 / 1; the first upsampler spreads a frame
    over 4 samples, one channel each (tone t, phase k -> channel 4t + k); the second writes each of those
    samples' 4 output samples as the positive and negative halves of that tone's sine (channels 2t, 2t + 1:
    nothing negative meets the leaky ReLUs); the residual blocks are zeroed (identity); conv_post adds
    positive minus negative halves."""
    from mixtune.models.audioldm2 import log_mel, mel_settings

    voc = pipeline.vocoder
    settings = mel_settings(voc.config)
    rate, hop = settings["rate"], settings["hop"]
    if hop != 16 or list(voc.config.upsample_rates) != [4, 4] or voc.config.upsample_initial_channel != 16:
        raise ValueError("voice_two_tones needs the tiny pipeline's vocoder (hop 16 as 4 x 4, 16 channels)")
    rng = random.Random(0)
    bins = [int(log_mel(torch.from_numpy(tone(f, 1024, rate, rng)), settings).mean(0).argmax())
            for f in (LOW_HZ, HIGH_HZ)]
    for p in voc.parameters():
        p.zero_()
    for t, b in enumerate(bins):
        voc.conv_pre.weight[t, b, 3] = scale
        voc.conv_pre.bias[t] = scale * 11.6  # log(1e-5) = -11.5: silence maps to 0
    up1, up2 = voc.upsampler
    for t in range(2):
        for k in range(4):
            up1.weight[t, 4 * t + k, k + 2] = 1.0  # padding 2: tap k + 2 lands on sample 4 i + k
            for j in range(4):
                phase = 2 * np.pi * (LOW_HZ, HIGH_HZ)[t] * (4 * k + j) / rate
                value = float(np.sin(phase))
                up2.weight[4 * t + k, 2 * t + (value < 0), j + 2] = abs(value)
    for t in range(2):
        voc.conv_post.weight[0, 2 * t, 3] = 1.0
        voc.conv_post.weight[0, 2 * t + 1, 3] = -1.0
    return {"vocoder_bins": bins}


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
    parts = {**fit_vae(pipeline, fit_steps), **voice_two_tones(pipeline)}
    base = os.path.join(output_dir, "tiny_pipeline")
    pipeline.save_pretrained(base)
    timings["fit_tiny_parts_s"] = round(time.time() - start, 1)
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
