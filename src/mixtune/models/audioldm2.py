"""AudioLDM2: text-to-audio latent diffusion, loaded and saved as a diffusers pipeline folder. Task: text_to_audio.

A diffusers folder has no config.json at its root but a `model_index.json` naming the pipeline class; the
registry reads that (`model_type_of`). The parts, as diffusers names them: `unet` (what trains), `text_encoder`
(CLAP), `text_encoder_2` (T5, or VITS for the speech checkpoints), `projection_model`, `language_model` (GPT-2,
which turns the projected text embeddings into the UNet's first conditioning), `vae` (log-mel spectrogram <->
latents) and `vocoder` (SpeechT5 HiFi-GAN: log-mel -> waveform). Training holds them in `AudioLDM2ForTraining`,
an nn.Module whose parameter names start with the part's name, so freeze globs, LoRA regexes and named parts
read the same way as for every other family.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from mixtune.errors import MixtuneError
from mixtune.models.family import Family
from mixtune.models.tiny import seeded

PIPELINE_CLASS = "AudioLDM2Pipeline"
MODEL_TYPE = "audioldm2"
MODULE_PARTS = ("unet", "text_encoder", "text_encoder_2", "projection_model", "language_model", "vae", "vocoder")
INSTALL = "pip install 'mixtune[diffusion]'  (or: pip install diffusers)"


def require_diffusers() -> None:
    import importlib.util

    if importlib.util.find_spec("diffusers") is None:
        raise MixtuneError(f"AudioLDM2 checkpoints load through diffusers, which is not installed: {INSTALL}")


def model_type_of(folder: str) -> str | None:
    """`audioldm2` for a diffusers AudioLDM2 folder (model_index.json), None for any other folder."""
    path = os.path.join(folder, "model_index.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        name = json.load(f).get("_class_name")
    if name != PIPELINE_CLASS:
        raise MixtuneError(f"{folder} is a diffusers {name} folder; mixtune trains {PIPELINE_CLASS} folders only")
    return MODEL_TYPE


def load_pipeline(path: str, dtype: torch.dtype = torch.float32):
    require_diffusers()
    from diffusers import AudioLDM2Pipeline

    try:
        pipeline = AudioLDM2Pipeline.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise MixtuneError(f"cannot load the AudioLDM2 pipeline '{path}': {e}") from None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


class AudioLDM2ForTraining(nn.Module):
    """The pipeline's modules as one nn.Module (parameter names `unet.…`, `vae.…`, …) plus its scheduler,
    tokenizers and feature extractor. `forward` is the diffusion training loss of the UNet."""

    def __init__(self, pipeline):
        super().__init__()
        for name in MODULE_PARTS:
            setattr(self, name, getattr(pipeline, name))
        self.pipeline = pipeline  # not an attribute nn.Module registers: its modules are the ones above
        # the pipeline's own noise schedule and prediction type; a copy, so set_timesteps at eval leaves it be
        self.noise_scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config)
        kind = self.noise_scheduler.config.prediction_type
        if kind not in ("epsilon", "v_prediction"):
            raise MixtuneError(f"the pipeline's scheduler predicts '{kind}'; mixtune trains 'epsilon' and "
                               "'v_prediction' (the AudioLDM2 checkpoints use one of these)")
        self.prompt_cache: dict[str, tuple] | None = None  # caption -> conditioning, when the text side is frozen

    def __setattr__(self, name, value):
        if name == "pipeline":  # keep the pipeline out of nn.Module's registry (its parts are registered above)
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def train(self, mode: bool = True):
        """Frozen parts stay in eval mode: no dropout in the conditioning the UNet learns from (nor in the
        cached one), and no random draws that would make a resumed run differ from an uninterrupted one."""
        super().train(mode)
        for name in MODULE_PARTS:
            part = getattr(self, name)
            if not any(p.requires_grad for p in part.parameters()):
                part.eval()
        return self

    @property
    def text_side_frozen(self) -> bool:
        parts = (self.text_encoder, self.text_encoder_2, self.projection_model, self.language_model)
        return not any(p.requires_grad for part in parts for p in part.parameters())

    def encode_captions(self, captions: list[str]):
        """The pipeline's own conditioning: T5 states + mask (second cross-attention) and GPT-2's generated
        states (first cross-attention), as `AudioLDM2Pipeline.encode_prompt` computes them."""
        device = next(self.unet.parameters()).device
        if self.prompt_cache is not None and self.text_side_frozen:
            missing = [c for c in dict.fromkeys(captions) if c not in self.prompt_cache]
            if missing:
                with torch.no_grad():
                    embeds, mask, generated = self.pipeline.encode_prompt(missing, device, 1, False)
                for i, c in enumerate(missing):
                    self.prompt_cache[c] = (embeds[i], mask[i], generated[i])
            rows = [self.prompt_cache[c] for c in captions]
            return tuple(torch.stack([r[k] for r in rows]) for k in range(3))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.text_side_frozen):
            return self.pipeline.encode_prompt(captions, device, 1, False)

    def latents_of(self, mel: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """VAE latents of log-mel spectrograms (B, 1, frames, mel bins), scaled as the pipeline unscales them."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in self.vae.parameters())):
            dist = self.vae.encode(mel.to(self.vae.dtype)).latent_dist
            return dist.sample(generator) * self.vae.config.scaling_factor

    def forward(self, mel: torch.Tensor, captions: list[str], generator: torch.Generator | None = None,
                return_loss: bool = True):
        latents = self.latents_of(mel, generator)
        embeds, mask, generated = self.encode_captions(captions)
        sched = self.noise_scheduler
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        steps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                              device=latents.device)
        noisy = sched.add_noise(latents, noise, steps)
        if sched.config.prediction_type == "epsilon":
            target = noise
        else:  # v_prediction (checked at load)
            target = sched.get_velocity(latents, noise, steps)
        pred = self.unet(noisy, steps, encoder_hidden_states=generated, encoder_hidden_states_1=embeds,
                         encoder_attention_mask_1=mask, return_dict=False)[0]
        return {"loss": nn.functional.mse_loss(pred.float(), target.float())}


# --- the log-mel spectrogram the VAE and the vocoder read --------------------------------------------------
# AudioLDM2's checkpoints take 64 mel bins of a 1024-point STFT with hop 160 at 16 kHz (magnitude, Slaney mel,
# natural log of max(x, 1e-5)). The hop is the vocoder's upsampling factor and the bins its input width; the
# window keeps AudioLDM's ratio of 6.4 hops, rounded up to a power of two.

def mel_settings(vocoder_config) -> dict:
    import math

    hop = int(math.prod(vocoder_config.upsample_rates))
    n_fft = 2 ** math.ceil(math.log2(hop * 6.4))
    return dict(rate=int(vocoder_config.sampling_rate), hop=hop, n_fft=n_fft, n_mels=int(vocoder_config.model_in_dim))


def log_mel(samples: torch.Tensor, settings: dict, soft_floor: bool = False) -> torch.Tensor:
    """(n,) waveform -> (n // hop, n_mels) log-mel spectrogram. `soft_floor`: log(x + 1e-5) instead of the
    clamp, so that a gradient reaches a near-silent waveform (fitting a vocoder)."""
    import numpy as np
    from transformers.audio_utils import mel_filter_bank

    n_fft, hop = settings["n_fft"], settings["hop"]
    fb = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=settings["n_mels"], min_frequency=0.0,
                         max_frequency=settings["rate"] / 2, sampling_rate=settings["rate"], norm="slaney",
                         mel_scale="slaney")
    pad = (n_fft - hop) // 2
    x = nn.functional.pad(samples[None, None].float(), (pad, pad), mode="reflect")[0, 0]
    spec = torch.stft(x, n_fft, hop_length=hop, win_length=n_fft, window=torch.hann_window(n_fft),
                      center=False, return_complex=True).abs()  # (freq, frames)
    mel = torch.from_numpy(np.asarray(fb, dtype=np.float32)).T @ spec
    frames = len(samples) // hop
    mel = mel[:, :frames]
    return (torch.log(mel + 1e-5) if soft_floor else torch.log(torch.clamp(mel, min=1e-5))).T.contiguous()


def segment_frames(pipeline) -> int:
    """The spectrogram length the pipeline generates by default (UNet sample size x VAE scale)."""
    return int(pipeline.unet.config.sample_size * pipeline.vae_scale_factor)


# --- the tiny pipeline ---------------------------------------------------------------------------------------
TINY_WORDS = ("a low tone", "a high tone", "a dog barks", "rain falls", "a bell rings", "music", "speech", "noise",
              "soft loud steady pure clear short long quiet")  # the demo's caption words


def tiny_roberta_tokenizer():
    """RoBERTa's tokenizer class (the pipeline tests isinstance to choose prompt text) over a local BPE."""
    from transformers import RobertaTokenizer

    from mixtune.models.tokenizer import train_tokenizer

    bpe = train_tokenizer(["<s>", "<pad>", "</s>", "<unk>", "<mask>"], vocab_size=400,
                          extra_text="\n".join(TINY_WORDS)).backend_tokenizer
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return RobertaTokenizer(vocab=model["vocab"], merges=merges, model_max_length=77)


def tiny_t5_tokenizer():
    """T5's tokenizer class over a small unigram vocabulary of the tiny captions' words and letters."""
    from transformers import T5Tokenizer

    words = sorted({w for text in TINY_WORDS for w in text.split()})
    letters = sorted({ch for w in words for ch in w})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in words] + \
        [("▁", -2.0)] + [(ch, -3.0) for ch in letters]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=77)


def build_tiny_pipeline():
    """AudioLDM2Pipeline with every part real and random at toy sizes (diffusers' own pipeline test sizes, but a
    hop of 16 and the released checkpoints' three attentions per UNet block): a 16 kHz, 8-mel-bin spectrogram of
    64 frames (1024 samples, 64 ms). The vocoder turns a steady spectrogram into a waveform periodic in its hop,
    so it can only voice multiples of rate / hop: hop 16 allows every multiple of 1 kHz (the test sizes' hop of 4
    only 4 and 8 kHz)."""
    require_diffusers()
    from diffusers import AudioLDM2Pipeline, AutoencoderKL, DDIMScheduler
    from diffusers.pipelines.audioldm2 import AudioLDM2ProjectionModel, AudioLDM2UNet2DConditionModel
    from transformers import (ClapConfig, ClapFeatureExtractor, ClapModel, GPT2Config, GPT2LMHeadModel,
                              SpeechT5HifiGan, SpeechT5HifiGanConfig, T5Config, T5EncoderModel)

    seeded()
    unet = AudioLDM2UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, sample_size=32, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        # as the released checkpoints: per block a self-attention (None), GPT-2's states (16) and T5's (32); with
        # one dimension per block (diffusers' pipeline test sizes) the UNet reads GPT-2's states only
        cross_attention_dim=([None, 16, 32], [None, 16, 32]))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False)
    seeded()
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=1, out_channels=1, norm_num_groups=8,
                        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4)
    seeded()
    tokenizer = tiny_roberta_tokenizer()
    text = dict(bos_token_id=0, eos_token_id=2, hidden_size=8, intermediate_size=37, layer_norm_eps=1e-5,
                num_attention_heads=1, num_hidden_layers=1, pad_token_id=1, vocab_size=len(tokenizer), projection_dim=8)
    audio = dict(spec_size=16, window_size=4, num_mel_bins=8, intermediate_size=37, layer_norm_eps=1e-5, depths=[1, 1],
                 num_attention_heads=[1, 1], num_hidden_layers=1, hidden_size=192, projection_dim=8, patch_size=2,
                 patch_stride=2, patch_embed_input_channels=1)
    text_encoder = ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=16))
    # 7 frames x 8 mel bins: what the tiny CLAP audio tower (spec_size 16, no fusion) reads
    feature_extractor = ClapFeatureExtractor(feature_size=8, sampling_rate=16000, hop_length=2400, max_length_s=1,
                                             fft_window_size=4096, truncation="rand_trunc")
    seeded()
    tokenizer_2 = tiny_t5_tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_ff=37, d_kv=8, num_heads=2,
                                             num_layers=2, pad_token_id=tokenizer_2.pad_token_id,
                                             eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=0))
    seeded()
    language_model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_head=2, n_layer=2, vocab_size=1000, n_ctx=99,
                                                n_positions=99, bos_token_id=0, eos_token_id=0))
    language_model.config.max_new_tokens = 8
    seeded()
    projection_model = AudioLDM2ProjectionModel(text_encoder_dim=16, text_encoder_1_dim=32, langauge_model_dim=16)
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=8, sampling_rate=16000, upsample_initial_channel=16, upsample_rates=[4, 4],
        upsample_kernel_sizes=[8, 8], resblock_kernel_sizes=[3, 7], resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
        normalize_before=False))
    return AudioLDM2Pipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                             projection_model=projection_model, language_model=language_model, tokenizer=tokenizer,
                             tokenizer_2=tokenizer_2, feature_extractor=feature_extractor, unet=unet,
                             scheduler=scheduler, vocoder=vocoder)


def build_tiny(output_dir: str) -> str:
    pipeline = build_tiny_pipeline()
    os.makedirs(output_dir, exist_ok=True)
    pipeline.save_pretrained(output_dir)
    return output_dir


# --- LoRA adapters on the UNet ----------------------------------------------------------------------------------
def load_unet_adapter(pipeline, adapter_dir: str, merge: bool = True):
    """A mixtune AudioLDM2 LoRA folder (peft's format, keyed on the UNet) into `pipeline.unet`. merge=True folds
    it in (a plain UNet again); False leaves peft's LoRA layers in place."""
    from peft import PeftModel

    try:
        wrapped = PeftModel.from_pretrained(pipeline.unet, adapter_dir)
    except (OSError, ValueError) as e:
        raise MixtuneError(f"cannot load the UNet LoRA adapter '{adapter_dir}': {e}") from None
    pipeline.unet = wrapped.merge_and_unload() if merge else wrapped.base_model.model
    return pipeline


UNET_ATTENTION = r"unet\..*attentions\.\d+\.transformer_blocks\.\d+\.attn\d\.(to_q|to_k|to_v|to_out\.0)"

FAMILY = Family(
    name="audioldm2",
    model_types=(MODEL_TYPE,),
    vision=(),
    projector=(),
    image_placeholder="",
    build_tiny=build_tiny,
    language=(),
    lora_targets=UNET_ATTENTION,
    uses_chat_template=False,
    reads_images=False,
    requires=("diffusers",),
    auto_class="",
    task="text_to_audio",
    parts=tuple((name.removesuffix("_model") if name == "projection_model" else name, (f"{name}.*",))
                for name in MODULE_PARTS),
)
