"""Golden fixture for MiniMonkey's model path, from PaddleMIX's own `MiniMonkeyChatModel` (PaddlePaddle, CPU).

Builds PaddleMIX's MiniMonkeyChatModel tiny (InternViT + mlp1 + InternLM2 with grouped-query attention), sets every
parameter to random int8 values times a power of two (exact in fp32), cuts a synthetic image with PaddleMIX's chat
demo layout (chat_demo_minimonkey.py: `dynamic_preprocess` min 4 max 12, `dynamic_preprocess2` min 3 max 7) and
transform, and saves: the weights under the published key names (torch layout), the image, the prompt ids, the
forward logits, per-tile pixel sums, and `generate(..., use_scm=True)`'s compressed prompt embeddings (what it hands
the language model's generate) and its greedy tokens.

Run from a folder holding PaddleMIX's source (paddlemix/models/internvl2, model_utils.py, utils/, datasets/):
  /path/to/paddle_venv/bin/python make_golden_scm_paddlemix.py OUT_DIR
"""
import json
import logging
import os
import sys
import types

import numpy as np
import paddle

ROOT = os.getcwd()
for name, path in (("paddlemix", "paddlemix"), ("paddlemix.models", "paddlemix/models"),
                   ("paddlemix.models.internvl2", "paddlemix/models/internvl2"),
                   ("paddlemix.models.internvl2.internvl_chat", "paddlemix/models/internvl2/internvl_chat"),
                   ("paddlemix.datasets", "paddlemix/datasets")):
    # empty packages: PaddleMIX's own __init__ files import every model
    mod = types.ModuleType(name)
    mod.__path__ = [os.path.join(ROOT, path)]
    sys.modules[name] = mod

# Import-only stubs (no model arithmetic): PaddleMIX's internvl2 imports a logger from ppdiffusers (not installed)
# and names Qwen2Config / Qwen2ForCausalLM, which PaddleNLP 2.8.1 lacks; this fixture uses InternLM2.
import paddlenlp.transformers as pnt  # noqa: E402


class _Logger(logging.Logger):
    def warning_once(self, *args, **kwargs):
        self.warning(*args, **kwargs)


ppd, ppd_utils = types.ModuleType("ppdiffusers"), types.ModuleType("ppdiffusers.utils")
ppd_utils.logging = types.SimpleNamespace(get_logger=lambda name: _Logger(name))
ppd.utils = ppd_utils
sys.modules["ppdiffusers"], sys.modules["ppdiffusers.utils"] = ppd, ppd_utils
for missing in ("Qwen2Config", "Qwen2ForCausalLM"):
    if not hasattr(pnt, missing):
        setattr(pnt, missing, type(missing, (), {}))

from paddlemix.datasets.internvl_dataset import build_transform, dynamic_preprocess, dynamic_preprocess2  # noqa: E402
from paddlemix.models.internvl2.internvl_chat.configuration_internvl_chat import InternVLChatConfig  # noqa: E402
from paddlemix.models.internvl2.internvl_chat.modeling_minimonkey_chat import MiniMonkeyChatModel  # noqa: E402
from PIL import Image  # noqa: E402

OUT = sys.argv[1]
V, TILE = 128, 56
IMG_START, IMG_END, IMG_CONTEXT = V - 3, V - 2, V - 1
llm = dict(architectures=["InternLM2ForCausalLM"], vocab_size=V, hidden_size=64, intermediate_size=96,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
           rope_theta=10000, rms_norm_eps=1e-6, bias=False, tie_word_embeddings=False, attn_implementation="eager",
           pad_token_id=0, bos_token_id=1, eos_token_id=2)
vision = dict(architectures=["InternVisionModel"], hidden_size=32, intermediate_size=64, num_attention_heads=4,
              num_hidden_layers=2, image_size=TILE, patch_size=14, qkv_bias=True, qk_normalization=False,
              norm_type="layer_norm", layer_norm_eps=1e-6, use_flash_attn=False, hidden_act="gelu",
              drop_path_rate=0.0, initializer_factor=0.1)
chat = dict(select_layer=-1, force_image_size=TILE, downsample_ratio=0.5, template="internlm2-chat",
            ps_version="v2", dynamic_image_size=True, use_thumbnail=True, min_dynamic_patch=1, max_dynamic_patch=12)
config = InternVLChatConfig(vision_config=vision, llm_config=llm, **chat)
paddle.seed(0)
model = MiniMonkeyChatModel(config)
model.img_context_token_id = IMG_CONTEXT
model.eval()
rng = np.random.default_rng(0)

weights = {}
for name, p in model.named_parameters():
    shape = list(p.shape)
    q = rng.integers(-63, 64, size=shape).astype(np.int8)
    leaf = name.split(".")[-2] if "." in name else name
    is_norm = name.endswith(".weight") and len(shape) == 1 and ("norm" in leaf or name == "mlp1.0.weight")
    offset, scale = (1.0, 2.0 ** -8) if is_norm else (0.0, 2.0 ** -7 if len(shape) == 1 else 2.0 ** -8)
    if name.endswith("tok_embeddings.weight") or name.endswith(("class_embedding", "position_embedding")):
        scale = 2.0 ** -5
    p.set_value(paddle.to_tensor(offset + q.astype(np.float32) * np.float32(scale), dtype="float32"))
    transpose = len(shape) == 2 and not name.endswith("tok_embeddings.weight")  # paddle Linear is (in, out)
    weights[name] = (q.T.copy() if transpose else q, np.float32(offset), np.float32(scale))

# a 120 x 120 image: detail grid (3, 3) of 56-pixel tiles, adaptive grid (2, 2) (it divides 3 in neither direction)
yy, xx = np.mgrid[0:120, 0:120]
image_u8 = np.clip(np.stack([xx * 255 // 119, yy * 255 // 119, ((xx * 3 + yy * 5) * 7) % 256], -1)
                   + rng.integers(-20, 21, size=(120, 120, 3)), 0, 255).astype(np.uint8)
image = Image.fromarray(image_u8, "RGB")
detail, target_aspect_ratio = dynamic_preprocess(image, image_size=TILE, use_thumbnail=True, min_num=4, max_num=12,
                                                 return_target_aspect_ratio=True)
adaptive = dynamic_preprocess2(image, image_size=TILE, use_thumbnail=True, min_num=3, max_num=7,
                               prior_aspect_ratio=target_aspect_ratio)
tiles = adaptive[:-1] + detail[:-1] + adaptive[-1:]  # chat_demo_minimonkey.py, main
transform = build_transform(is_train=False, input_size=TILE)
pixels = np.stack([transform(t).numpy() for t in tiles]).astype(np.float32)
print("detail grid", target_aspect_ratio, "tiles", len(tiles))

T = 4  # tokens per tile: (56/14)^2 / 4
ids = list(rng.integers(3, V - 3, size=6)) + [IMG_START] + [IMG_CONTEXT] * (len(tiles) * T) + [IMG_END] + \
    list(rng.integers(3, V - 3, size=9))
ids = np.array([ids], dtype=np.int64)
with paddle.no_grad():
    logits = model(pixel_values=paddle.to_tensor(pixels), input_ids=paddle.to_tensor(ids),
                   attention_mask=paddle.ones(ids.shape, dtype="int64"),
                   image_flags=paddle.ones([len(tiles), 1], dtype="int64"), return_dict=True).logits.numpy()

captured = {}
language_generate = model.language_model.generate


def spy(**kwargs):  # what SCM hands the language model
    captured["embeds"] = kwargs["inputs_embeds"].numpy()
    return language_generate(**kwargs)


model.language_model.generate = spy
with paddle.no_grad():
    out = model.generate(pixel_values=paddle.to_tensor(pixels), input_ids=paddle.to_tensor(ids),
                         attention_mask=paddle.ones(ids.shape, dtype="int64"),
                         target_aspect_ratio=target_aspect_ratio, use_scm=True, max_new_tokens=4,
                         decode_strategy="greedy_search", eos_token_id=-1)
generated = out[0].numpy()
print("logits", logits.shape, "scm embeds", captured["embeds"].shape, "generated", generated)

# the pixel tensor itself is large: its per-tile, per-channel sums locate a mismatch (the logits prove equality)
arrays = {"input_ids": ids.astype(np.int16), "image_u8": image_u8, "pixel_sums": pixels.sum((2, 3)), "logits": logits,
          "detail_grid": np.array(target_aspect_ratio, dtype=np.int64), "scm_embeds": captured["embeds"],
          "scm_generated": generated.astype(np.int64)}
for key, (q, offset, scale) in weights.items():
    arrays[f"w:{key}"] = q
    arrays[f"offset:{key}"] = offset
    arrays[f"scale:{key}"] = scale
np.savez_compressed(os.path.join(OUT, "scm_golden.npz"), **arrays)
published = {"model_type": "internvl_chat", "architectures": ["MiniMonkeyChatModel"],
             "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                          "AutoModel": "modeling_minimonkey_chat.MiniMonkeyChatModel",
                          "AutoModelForCausalLM": "modeling_minimonkey_chat.MiniMonkeyChatModel"},
             "vision_config": {"model_type": "intern_vit_6b", **vision},
             "llm_config": {"model_type": "internlm2", **llm}, **chat}
with open(os.path.join(OUT, "scm_config.json"), "w") as f:
    json.dump(published, f, indent=1)
print("saved", os.path.getsize(os.path.join(OUT, "scm_golden.npz")))
