"""Golden fixture for mixtune's InternLM-XComposer2 port, from PaddleMIX's own internlm_xcomposer2 implementation
(PaddlePaddle, CPU).

Builds PaddleMIX's InternLMXComposer2ForCausalLM tiny (InternLM2 with GQA and Partial LoRA on every projection, a
CLIP vision tower, the 2-layer vision projector), sets every parameter to random int8 values times a power of two
(exact in fp32, small to store), and runs one fixed sample with one image through PaddleMIX's own splicing
(`interleav_wrap`: text piece, the image's vectors, text piece; and its `im_mask`). Saves the weights under the
published internlm-xcomposer2-7b key names (torch layout), the text pieces' ids, the pixels, the logits and a label
loss.

Run from a folder holding PaddleMIX's source (paddlemix/models/internlm_xcomposer2/):
    /path/to/paddle_venv/bin/python make_golden_paddlemix.py OUT_DIR
"""
import json
import logging
import os
import sys
import tempfile
import types

import numpy as np
import paddle

ROOT = os.getcwd()
for name, path in (("paddlemix", "paddlemix"), ("paddlemix.models", "paddlemix/models")):
    # empty packages: PaddleMIX's own __init__ files import every model, and one of them fails on Python 3.11
    mod = types.ModuleType(name)
    mod.__path__ = [os.path.join(ROOT, path)]
    sys.modules[name] = mod
# PaddleMIX's modeling imports only a logger from ppdiffusers (not installed here): a stand-in for that import
ppdiffusers, utils = types.ModuleType("ppdiffusers"), types.ModuleType("ppdiffusers.utils")
utils.logging = types.SimpleNamespace(get_logger=logging.getLogger)
sys.modules.update({"ppdiffusers": ppdiffusers, "ppdiffusers.utils": utils})

from paddlemix.models.internlm_xcomposer2.configuration import InternLMXcomposer2Config  # noqa: E402
from paddlemix.models.internlm_xcomposer2.modeling import InternLMXComposer2ForCausalLM  # noqa: E402
from paddlenlp.transformers import CLIPVisionConfig, CLIPVisionModel  # noqa: E402

OUT = sys.argv[1]
V, H, INTER, LAYERS, HEADS, KV_HEADS = 128, 64, 96, 2, 4, 2
# PaddleMIX's tower keeps a position table of 16x16 + 1 rows as is (anything else it resizes from 24x24, for
# ViT-L/14-336): 112 / 7 = 16 patches a side, so 256 image vectors
IMG, PATCH, VW = 112, 7, 32
vision = dict(hidden_size=VW, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=IMG,
              patch_size=PATCH, hidden_act="quick_gelu", layer_norm_eps=1e-5)
llm = dict(vocab_size=V, hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
           num_key_value_heads=KV_HEADS, max_position_embeddings=32768, rms_norm_eps=1e-5, bias=False,
           rope_theta=1000000, rope_scaling={"type": "dynamic", "factor": 1.0}, hidden_act="silu",
           bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
TOWER_DIR = tempfile.mkdtemp()  # PaddleMIX's tower loads a CLIP vision model by name or folder
paddle.seed(0)
CLIPVisionModel(CLIPVisionConfig(**vision)).save_pretrained(TOWER_DIR)
config = InternLMXcomposer2Config(**llm, max_length=4096, img_size=IMG, vision_tower=TOWER_DIR,
                                  vision_projector={"mlp_depth": 2, "mm_hidden_size": VW, "hidden_size": H})
model = InternLMXComposer2ForCausalLM(config)
model.eval()

CLIP_NAMES = [("class_embedding", "embeddings.class_embedding"), ("conv1.", "embeddings.patch_embedding."),
              ("positional_embedding.", "embeddings.position_embedding."), ("ln_pre.", "pre_layrnorm."),
              ("ln_post.", "post_layernorm."), ("transformer.layers.", "encoder.layers."), (".linear1.", ".mlp.fc1."),
              (".linear2.", ".mlp.fc2."), (".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2.")]


def original_name(name):
    """PaddleMIX's parameter name -> the published one (transformers' CLIP names inside the tower)."""
    prefix = "vit.vision_tower.vision_model."
    if name.startswith(prefix):
        rest = name[len(prefix):]
        for a, b in CLIP_NAMES:
            rest = rest.replace(a, b)
        return prefix + rest
    return name


rng = np.random.default_rng(0)
weights = {}
for name, p in model.named_parameters():
    shape = p.shape
    q = rng.integers(-63, 64, size=shape).astype(np.int8)
    leaf = name.split(".")[-2] if "." in name else name
    is_norm = len(shape) == 1 and name.endswith(".weight") and ("norm" in leaf or leaf.startswith("ln_"))
    offset, scale = (1.0, 2.0 ** -8) if is_norm else (0.0, 2.0 ** -7 if len(shape) == 1 else 2.0 ** -8)
    if name.endswith("tok_embeddings.weight"):
        scale = 2.0 ** -5
    p.set_value(paddle.to_tensor(offset + q.astype(np.float32) * np.float32(scale), dtype="float32"))
    key = original_name(name)
    # paddle Linear weights are (in, out); torch's are (out, in). Embeddings, the conv and the class vector are not.
    transpose = len(shape) == 2 and not key.endswith(("tok_embeddings.weight", "position_embedding.weight"))
    weights[key] = (q.T.copy() if transpose else q, np.float32(offset), np.float32(scale))
    print(f"{name:70s} -> {key:75s} {list(shape)} {'T' if transpose else ''}")
# PaddleMIX's tower drops the CLIP model's final norm (it only normalises the pooled class vector, which XComposer2
# never reads); the published checkpoint has it. Stored at its init values so every published key is present.
for suffix, value in (("weight", 1.0), ("bias", 0.0)):
    weights[f"vit.vision_tower.vision_model.post_layernorm.{suffix}"] = (np.zeros(VW, np.int8), np.float32(value),
                                                                         np.float32(1.0))

# One sample: <s> + text, the image, text (PaddleMIX's interleav_wrap puts image k after text piece k)
before = [1] + list(rng.integers(3, V, size=7))
after = list(rng.integers(3, V, size=14))
pix_q = rng.integers(-127, 128, size=(1, 3, IMG, IMG)).astype(np.int8)
pixels = paddle.to_tensor(pix_q.astype(np.float32) / 64)
parts = [{"input_ids": paddle.to_tensor([ids], dtype="int64"), "attention_mask": paddle.ones([1, len(ids)], "int64")}
         for ids in (before, after)]
with paddle.no_grad():
    embeds, atts, _, im_mask = model.interleav_wrap([pixels], [parts])
    n_image = int(im_mask.sum())
    labels = np.full((1, embeds.shape[1]), -100, dtype=np.int64)
    labels[0, -6:] = after[-6:]  # the last 6 tokens are the "reply"
    out = model(inputs_embeds=embeds, attention_mask=atts, im_mask=im_mask.astype("bool"),
                labels=paddle.to_tensor(labels), return_dict=True)
    logits, loss = out.logits.numpy(), out.loss.numpy()
print("image vectors", n_image, "logits", logits.shape, float(np.abs(logits).mean()), "loss", float(loss))

arrays = {"before_ids": np.array(before, np.int16), "after_ids": np.array(after, np.int16), "pixels_q": pix_q,
          "pixels_scale": np.float32(1 / 64), "im_mask": im_mask.numpy().astype(bool),
          "labels": labels.astype(np.int16),
          "logits": logits.astype(np.float32), "loss": np.float32(loss)}
for key, (q, offset, scale) in weights.items():
    arrays[f"w:{key}"] = q
    arrays[f"offset:{key}"] = offset
    arrays[f"scale:{key}"] = scale
np.savez_compressed(os.path.join(OUT, "golden.npz"), **arrays)
published = {"model_type": "internlmxcomposer2", "architectures": ["InternLMXComposer2ForCausalLM"], **llm,
             "max_length": 4096, "img_size": IMG, "vision_config": vision}
with open(os.path.join(OUT, "config.json"), "w") as f:
    json.dump(published, f, indent=1)
print("saved", os.path.getsize(os.path.join(OUT, "golden.npz")))
