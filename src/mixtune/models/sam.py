"""SAM (transformers' SamModel + SamProcessor): an image encoder, a prompt encoder (boxes, points) and a mask
decoder. Task: segmentation (tasks/segmentation.py trains the mask decoder on prompts drawn from ground-truth
masks, the image encoder frozen by default).

SAM's processor resizes the longest image side to `size.longest_edge`, pads to `pad_size` and scales box and
point prompts with the image; the mask decoder predicts masks at a quarter of the padded image size.
"""

from __future__ import annotations

from mixtune.models.family import Family
from mixtune.models.tiny import save_checkpoint, seeded

# tiny SAM: 64-pixel padded images in 4-pixel patches (a 16x16 embedding), 64x64 predicted masks. Patches of 8
# (an 8x8 embedding, 32x32 masks) left the demo's held-out mIoU at 0.749 after 30 epochs; patches of 4 reach 0.8
# by epoch 21 (measured, seg_demo.py)
TINY_IMAGE_SIZE, TINY_PATCH = 64, 4
TINY_WIDTH = 32


def tiny_processor(image_size: int = TINY_IMAGE_SIZE, patch: int = TINY_PATCH):
    from transformers import SamImageProcessor, SamProcessor

    low_res = 4 * image_size // patch  # what the mask decoder predicts: 4x its embedding, as in SAM
    return SamProcessor(SamImageProcessor(size={"longest_edge": image_size},
                                          pad_size={"height": image_size, "width": image_size},
                                          mask_size={"longest_edge": low_res},
                                          mask_pad_size={"height": low_res, "width": low_res}))


def tiny_config(image_size: int = TINY_IMAGE_SIZE, patch: int = TINY_PATCH, width: int = TINY_WIDTH):
    from transformers import SamConfig

    return SamConfig(
        vision_config=dict(hidden_size=width, output_channels=width, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=patch, window_size=4, global_attn_indexes=[1],
                           num_pos_feats=width // 2, mlp_dim=2 * width, initializer_range=0.02),
        prompt_encoder_config=dict(hidden_size=width, image_size=image_size, patch_size=patch,
                                   mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=width, mlp_dim=2 * width, num_attention_heads=2,
                                 iou_head_hidden_dim=width))


def build_tiny(output_dir: str) -> str:
    import torch
    from transformers import SamModel

    seeded()
    model = SamModel(tiny_config())
    # transformers draws the prompt / image position frequencies with std hidden_size / 2 (16 here: 2 pi x 16
    # cycles across the image, a random hash of position that a tiny model cannot generalise from); SAM's
    # own code uses std 1. The pretrained checkpoints carry their trained values, so this only matters here.
    torch.nn.init.normal_(model.shared_image_embedding.positional_embedding, std=1.0)
    return save_checkpoint(model, tiny_processor(), output_dir)


VISION = ("vision_encoder.*",)
PROMPT = ("prompt_encoder.*", "shared_image_embedding.*")  # the shared embedding encodes prompt positions
DECODER = ("mask_decoder.*",)

FAMILY = Family(
    name="sam",
    model_types=("sam",),
    vision=VISION,
    projector=(),
    image_placeholder="",
    build_tiny=build_tiny,
    language=(),
    # LoRA on the image encoder's attention (the usual way to adapt SAM's encoder cheaply); the mask decoder
    # then trains fully beside the adapters (tasks/segmentation.py adds it to lora_modules_to_save)
    lora_targets=r"vision_encoder\.layers\.\d+\.attn\.(qkv|proj)",
    auto_class="SamModel",
    requires=("pycocotools",),  # COCO polygons / RLE to masks (pip install 'mixtune[detection]')
    uses_chat_template=False,
    task="segmentation",
    # "vision" (not "vision_encoder") so that the config's freeze_vision shortcut names the image encoder
    parts=(("vision", VISION), ("prompt_encoder", PROMPT), ("mask_decoder", DECODER)),
)
