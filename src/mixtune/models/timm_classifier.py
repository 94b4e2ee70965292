"""Any timm image model by name (EVA02 first): image classification. Task: classification.

Checkpoints are timm's own folder format (config.json with `architecture`, `model_args`, `pretrained_cfg`
and `label_names`, plus the weights), which `timm.create_model("local-dir:<folder>", pretrained=True)`
reads; config.json has no `model_type`, so the registry recognises it by `architecture`.
"""

from __future__ import annotations

from mixtune.models.family import Family
from mixtune.models.tiny import seeded

TINY_ARCHITECTURE = "eva02_tiny_patch14_224"
# eva02_tiny at toy sizes: 56-pixel images in 8-pixel patches, 64 wide, 2 blocks
TINY_ARGS = dict(img_size=56, patch_size=8, embed_dim=64, depth=2, num_heads=4)
TINY_LABELS = ["circle", "square", "triangle"]


def save_timm(model, output_dir: str, label_names: list[str] | None = None, model_args: dict | None = None,
              state_dict: dict | None = None) -> str:
    """timm's folder format (config.json + model.safetensors) for `model`, or for `state_dict` when given."""
    import os

    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    os.makedirs(output_dir, exist_ok=True)
    model_config = {"label_names": list(label_names)} if label_names else {}
    save_config_for_hf(model, os.path.join(output_dir, "config.json"), model_config=model_config,
                       model_args=model_args)
    state = state_dict if state_dict is not None else model.state_dict()
    save_file({k: v.detach().contiguous() for k, v in state.items()}, os.path.join(output_dir, "model.safetensors"))
    return output_dir


def load_timm(path: str):
    """A timm checkpoint folder -> (model, its config dict)."""
    import json
    import os

    import timm

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    return timm.create_model(f"local-dir:{os.path.abspath(path)}", pretrained=True), config


def build_tiny(output_dir: str) -> str:
    import timm

    seeded()
    args = dict(TINY_ARGS, num_classes=len(TINY_LABELS))
    model = timm.create_model(TINY_ARCHITECTURE, pretrained=False, **args)
    return save_timm(model, output_dir, TINY_LABELS, model_args=args)


HEAD = ("head.*", "fc_norm.*", "fc.*", "classifier.*", "head_drop.*")

FAMILY = Family(
    name="timm",
    model_types=("timm",),
    vision=("*",),
    projector=(),
    image_placeholder="",
    build_tiny=build_tiny,
    language=(),
    lora_targets=r"blocks\.\d+\.attn\.(qkv|q_proj|k_proj|v_proj|proj)",
    uses_chat_template=False,
    requires=("timm",),
    auto_class="",
    task="classification",
    parts=(("head", HEAD), ("backbone", ("*",))),
)
