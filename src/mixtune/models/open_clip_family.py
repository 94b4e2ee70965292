"""open_clip models: EVA-CLIP (family `open_clip`; its image tower a timm EVA02) and CoCa (family `coca`,
which adds a captioning decoder and loss). Task: contrastive.

A checkpoint is open_clip's own folder: `open_clip_config.json` (model_cfg + preprocess_cfg) and
`open_clip_model.safetensors`, which `open_clip.create_model_and_transforms("local-dir:<folder>")` reads.
Training wraps the model in `OpenClipForTraining` (parameter names gain a `model.` prefix) so the Trainer
gets a loss and the contrastive task its embeddings.
"""

from __future__ import annotations

import dataclasses

import json
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from mixtune.models.family import Family
from mixtune.models.tiny import seeded

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
CONTEXT = 32
TEXT = {"context_length": CONTEXT, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}
VIT = {"image_size": 56, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8}
# open_clip builds its timm towers (EVA-CLIP's EVA02) at the trunk's own size, 224 pixels and 12 blocks for
# the smallest: the tiny checkpoint uses open_clip's ViT tower; EVA-CLIP itself is TINY_EVA_CLIP (slow test)
TINY_OPEN_CLIP = {"embed_dim": 32, "custom_text": True, "text_cfg": TEXT, "vision_cfg": VIT}
TINY_EVA_CLIP = {"embed_dim": 32, "custom_text": True, "text_cfg": TEXT,
                 "vision_cfg": {"image_size": 224, "timm_model_name": "eva02_tiny_patch14_224",
                                "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": "linear"}}
TINY_COCA = {"embed_dim": 64, "custom_text": True,  # CoCa: embed_dim = the decoder width
             "text_cfg": {**TEXT, "embed_cls": True, "output_tokens": True},
             "vision_cfg": {**VIT, "attentional_pool": True, "attn_pooler_heads": 4, "output_tokens": True},
             "multimodal_cfg": {**TEXT, "attn_pooler_heads": 4}}
CAPTION_LOSS_WEIGHT = 2.0  # open_clip's CoCa default (clip loss weight 1)


def read_model_cfg(path: str) -> dict:
    with open(os.path.join(path, CONFIG_NAME)) as f:
        config = json.load(f)
    return config.get("model_cfg", config)


def model_type_of(path: str) -> str:
    return "open_clip_coca" if "multimodal_cfg" in read_model_cfg(path) else "open_clip"


@dataclass
class OpenClipOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None


class OpenClipForTraining(nn.Module):
    """An open_clip model with the forward the Trainer and the contrastive task call."""

    def __init__(self, model, model_cfg: dict):
        super().__init__()
        self.model, self.model_cfg = model, model_cfg
        model.output_dict = True  # a dict of features rather than open_clip's positional tuple
        self.is_coca = "multimodal_cfg" in model_cfg

    @property
    def logit_scale(self):
        return self.model.logit_scale

    def forward(self, pixel_values, input_ids, return_loss: bool = True, **_) -> OpenClipOutput:
        from mixtune.tasks.contrastive import pair_loss

        out = self.model(pixel_values, input_ids)
        image, text = out["image_features"], out["text_features"]  # normalised by open_clip
        logits = text @ image.T * out["logit_scale"]
        loss = None
        if return_loss:
            loss = pair_loss(logits, sigmoid=False)
            if self.is_coca:  # teacher-forced captioning of the image, padding (id 0) ignored
                caption = nn.functional.cross_entropy(out["logits"].permute(0, 2, 1), out["labels"], ignore_index=0)
                loss = loss + CAPTION_LOSS_WEIGHT * caption
        return OpenClipOutput(loss=loss, logits_per_image=logits.T, logits_per_text=logits, text_embeds=text,
                              image_embeds=image)

    def save(self, output_dir: str, state_dict: dict | None = None) -> None:
        from open_clip.push_to_hf_hub import save_config_for_hf
        from pathlib import Path
        from safetensors.torch import save_file

        os.makedirs(output_dir, exist_ok=True)
        state = state_dict if state_dict is not None else self.state_dict()
        state = {k.removeprefix("model."): v.detach().contiguous() for k, v in state.items()}
        save_file(state, os.path.join(output_dir, WEIGHTS_NAME))
        save_config_for_hf(self.model, Path(output_dir) / CONFIG_NAME, model_config=self.model_cfg)


class OpenClipTokenizer:
    """open_clip's tokenizer called like a transformers one (fixed context length, id 0 pads)."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer, self.context_length = tokenizer, context_length

    def __call__(self, texts, max_length: int | None = None, **_) -> dict:
        ids = self.tokenizer(texts, context_length=self.context_length)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


class OpenClipImageProcessor:
    def __init__(self, transform):
        self.transform = transform

    def __call__(self, images, return_tensors: str = "pt") -> dict:
        return {"pixel_values": self.transform(images)[None]}


class OpenClipProcessor:
    """The image transform and tokenizer; saved with the weights by `OpenClipForTraining.save`."""

    def __init__(self, transform, tokenizer):
        self.image_processor, self.tokenizer = OpenClipImageProcessor(transform), tokenizer

    def save_pretrained(self, output_dir: str) -> None:
        pass  # open_clip rebuilds both from open_clip_config.json


def load_open_clip(path: str):
    """An open_clip checkpoint folder -> (training wrapper, processor)."""
    import open_clip

    ref = f"local-dir:{os.path.abspath(path)}"
    model, _, transform = open_clip.create_model_and_transforms(ref)
    cfg = read_model_cfg(path)
    tokenizer = OpenClipTokenizer(open_clip.get_tokenizer(ref), cfg["text_cfg"].get("context_length", 77))
    return OpenClipForTraining(model, cfg), OpenClipProcessor(transform, tokenizer)


def tiny_builder(model_cfg: dict):
    def build_tiny(output_dir: str) -> str:
        import open_clip

        seeded()
        name = f"mixtune-tiny-{abs(hash(json.dumps(model_cfg, sort_keys=True)))}"
        open_clip.factory._MODEL_CONFIGS[name] = model_cfg  # open_clip builds from registered configs
        model = open_clip.create_model(name)
        if hasattr(model, "text_decoder"):
            # open_clip 3.3's MultimodalTransformer never calls its init_parameters() (which would fail: it reads
            # self.transformer), so CoCa's text_decoder.text_projection stays torch.empty memory (0, 1e-40 or
            # 1e30 by allocator history: the tiny CoCa's loss exploded depending on what ran before). Its
            # intended init:
            nn.init.normal_(model.text_decoder.text_projection, std=model.text_decoder.width ** -0.5)
        OpenClipForTraining(model, model_cfg).save(output_dir)
        return output_dir
    return build_tiny


VISION = ("model.visual.*",)
TEXT_TOWER = ("model.text.*",)
# nn.MultiheadAttention (open_clip's own towers) reads its projection weights directly, bypassing any adapter
# on `out_proj`: adapters go on the MLPs there, and on the timm (EVA) towers' qkv / proj as well
LORA = r"model\.(visual|text)\..*\.(qkv|proj|c_fc|c_proj|fc1|fc2|fc1_g|fc1_x)"

FAMILY = Family(
    name="open_clip",
    model_types=("open_clip",),
    vision=VISION,
    projector=(),
    image_placeholder="",
    build_tiny=tiny_builder(TINY_OPEN_CLIP),
    language=TEXT_TOWER,
    lora_targets=LORA,
    uses_chat_template=False,
    requires=("open_clip",),
    auto_class="",
    task="contrastive",
    parts=(("vision", VISION), ("text", TEXT_TOWER)),
)

# CoCa: what differs from an open_clip CLIP is its captioning decoder, a part of its own
COCA = dataclasses.replace(FAMILY, name="coca", model_types=("open_clip_coca",), build_tiny=tiny_builder(TINY_COCA),
                           parts=(*FAMILY.parts, ("decoder", ("model.text_decoder.*",))))
