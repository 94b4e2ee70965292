"""Golden fixture for mixtune's InternVL2 port, from PaddleMIX's own internvl2 implementation (PaddlePaddle, CPU).

Builds PaddleMIX's InternVLChatModel tiny with its InternLM2 language model (grouped-query attention, dynamic NTK
rope scaling past a small max_position_embeddings), sets every parameter to random int8 values times a power of two
(exact in fp32, and small to store), runs one fixed batch (sample 0: one image of 3 tiles; sample 1: text only, its
padding tile flagged 0 in image_flags, as PaddleMIX's data pipeline writes text-only samples), and saves the
weights under the published key names (torch layout), the inputs, the logits and a label loss. Also: InternViT's
qk-norm / RMSNorm variant (InternViT-6B's) alone on the same tiles, and PaddleMIX's dynamic tiling + transform of a
fixed synthetic image (paddlemix/datasets/internvl_dataset.py)."""
import json
import os
import sys
import types

import numpy as np
import paddle

# Run from a folder holding PaddleMIX's source (paddlemix/models/internvl2, model_utils.py, utils/, datasets/):
#   /path/to/paddle_venv/bin/python make_golden_paddlemix.py OUT_DIR
ROOT = os.getcwd()
for name, path in (("paddlemix", "paddlemix"), ("paddlemix.models", "paddlemix/models"),
                   ("paddlemix.models.internvl2", "paddlemix/models/internvl2"),
                   ("paddlemix.models.internvl2.internvl_chat", "paddlemix/models/internvl2/internvl_chat"),
                   ("paddlemix.datasets", "paddlemix/datasets")):
    # empty packages: PaddleMIX's own __init__ files import every model (and MiniMonkey, patches) we do not run
    mod = types.ModuleType(name)
    mod.__path__ = [os.path.join(ROOT, path)]
    sys.modules[name] = mod

# Import-only stubs (no model arithmetic): PaddleMIX's internvl2 imports a logger from ppdiffusers (not installed),
# and names Qwen2Config / Qwen2ForCausalLM from PaddleNLP 2.8.1, which has no Qwen2; this fixture uses InternLM2.
import logging  # noqa: E402

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

from paddlemix.datasets.internvl_dataset import build_transform, dynamic_preprocess  # noqa: E402
from paddlemix.models.internvl2.internvl_chat.configuration_intern_vit import InternVisionConfig  # noqa: E402
from paddlemix.models.internvl2.internvl_chat.configuration_internvl_chat import InternVLChatConfig  # noqa: E402
from paddlemix.models.internvl2.internvl_chat.modeling_intern_vit import InternVisionModel  # noqa: E402
from paddlemix.models.internvl2.internvl_chat.modeling_internvl_chat import InternVLChatModel  # noqa: E402
from PIL import Image  # noqa: E402

OUT = sys.argv[1]
V, TILE = 128, 56
IMG_START, IMG_END, IMG_CONTEXT = V - 3, V - 2, V - 1
llm = dict(architectures=["InternLM2ForCausalLM"], vocab_size=V, hidden_size=64, intermediate_size=96,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
           rope_theta=10000, rope_scaling={"type": "dynamic", "factor": 2.0}, rms_norm_eps=1e-6, bias=False,
           tie_word_embeddings=False, attn_implementation="eager", pad_token_id=0, bos_token_id=1, eos_token_id=2)
vision = dict(architectures=["InternVisionModel"], hidden_size=32, intermediate_size=64, num_attention_heads=4,
              num_hidden_layers=2, image_size=TILE, patch_size=14, qkv_bias=True, qk_normalization=False,
              norm_type="layer_norm", layer_norm_eps=1e-6, use_flash_attn=False, hidden_act="gelu",
              drop_path_rate=0.0, initializer_factor=0.1)
chat = dict(select_layer=-1, force_image_size=TILE, downsample_ratio=0.5, template="internlm2-chat",
            ps_version="v2", dynamic_image_size=True, use_thumbnail=True, min_dynamic_patch=1, max_dynamic_patch=6)
config = InternVLChatConfig(vision_config=vision, llm_config=llm, **chat)
paddle.seed(0)
model = InternVLChatModel(config)
model.img_context_token_id = IMG_CONTEXT
model.eval()

rng = np.random.default_rng(0)


def quantise(model, prefix=""):
    """Every parameter to int8 x 2^-k (norm weights around 1); returns {published key: (int8 torch layout, offset,
    scale)}. Paddle Linear weights are (in, out); torch's are (out, in)."""
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
        transpose = len(shape) == 2 and not name.endswith("tok_embeddings.weight")
        weights[prefix + name] = (q.T.copy() if transpose else q, np.float32(offset), np.float32(scale))
        print(f"{prefix + name:60s} {shape} {'T' if transpose else ''}")
    return weights


weights = quantise(model)

T = 4  # tokens per tile: (56/14)^2 / 4
ids0 = list(rng.integers(3, V - 3, size=5)) + [IMG_START] + [IMG_CONTEXT] * (3 * T) + [IMG_END] + \
    list(rng.integers(3, V - 3, size=10))
ids1 = list(rng.integers(3, V - 3, size=len(ids0)))
ids = np.array([ids0, ids1], dtype=np.int64)
pix_q = rng.integers(-127, 128, size=(4, 3, TILE, TILE)).astype(np.int8)
pixels = pix_q.astype(np.float32) / 64
flags = np.array([[1], [1], [1], [0]], dtype=np.int64)
labels = np.full_like(ids, -100)
labels[:, -6:] = ids[:, -6:]
with paddle.no_grad():
    kwargs = dict(pixel_values=paddle.to_tensor(pixels), input_ids=paddle.to_tensor(ids),
                  attention_mask=paddle.ones(ids.shape, dtype="int64"), image_flags=paddle.to_tensor(flags),
                  return_dict=True)
    logits = model(**kwargs).logits.numpy()
    loss = model(**kwargs, labels=paddle.to_tensor(labels)).loss.numpy()
print("logits", logits.shape, float(np.abs(logits).mean()), "loss", float(loss))

# InternViT-6B's variant: RMSNorm and qk-norm, on the same tiles
qk_vision = dict(vision, norm_type="rms_norm", qk_normalization=True, qkv_bias=False)
vit = InternVisionModel(InternVisionConfig(**qk_vision))
vit.eval()
vit_weights = quantise(vit, prefix="qk:")
with paddle.no_grad():
    vit_out = vit(pixel_values=paddle.to_tensor(pixels), return_dict=True).last_hidden_state.numpy()

# PaddleMIX's own tiling and transform of a fixed synthetic image (150 x 70: a 2 x 1 grid plus the thumbnail)
yy, xx = np.mgrid[0:70, 0:150]
image_u8 = np.stack([(xx * 255 // 149), (yy * 255 // 69), ((xx + yy) * 7) % 256], -1).astype(np.uint8)
tiles = dynamic_preprocess(Image.fromarray(image_u8), min_num=1, max_num=6, image_size=TILE, use_thumbnail=True)
transform = build_transform(is_train=False, input_size=TILE)
processed = np.stack([transform(t).numpy() for t in tiles]).astype(np.float32)
print("processed", processed.shape)

arrays = {"input_ids": ids.astype(np.int16), "labels": labels.astype(np.int16), "pixels_q": pix_q,
          "pixels_scale": np.float32(1 / 64), "image_flags": flags.reshape(-1).astype(np.int8),
          "logits": logits.astype(np.float32), "loss": np.float32(loss), "qk_vit_hidden": vit_out.astype(np.float32),
          "image_u8": image_u8, "processed_pixels": processed}
for key, (q, offset, scale) in {**weights, **vit_weights}.items():
    arrays[f"w:{key}"] = q
    arrays[f"offset:{key}"] = offset
    arrays[f"scale:{key}"] = scale
np.savez_compressed(os.path.join(OUT, "golden.npz"), **arrays)
published = {"model_type": "internvl_chat", "architectures": ["InternVLChatModel"],
             "vision_config": {"model_type": "intern_vit_6b", **vision},
             "llm_config": {"model_type": "internlm2", **llm}, **chat}
with open(os.path.join(OUT, "config.json"), "w") as f:
    json.dump(published, f, indent=1)
with open(os.path.join(OUT, "qk_vit_config.json"), "w") as f:
    json.dump({"model_type": "intern_vit_6b", **qk_vision}, f, indent=1)
# PaddleMIX's own prompt for a two-turn conversation with one image (its internlm2-chat template)
from paddlemix.models.internvl2.conversation import get_conv_template  # noqa: E402

conv = get_conv_template("internlm2-chat")
turns = [("<image>\nWhat colour is the shape?", "red"), ("And its shape?", "circle")]
for question, answer in turns:
    conv.append_message(conv.roles[0], question)
    conv.append_message(conv.roles[1], answer)
with open(os.path.join(OUT, "conversation.json"), "w") as f:
    json.dump({"turns": turns, "system_message": conv.system_message, "prompt": conv.get_prompt()}, f, indent=1,
              ensure_ascii=False)
print("saved", os.path.getsize(os.path.join(OUT, "golden.npz")))
