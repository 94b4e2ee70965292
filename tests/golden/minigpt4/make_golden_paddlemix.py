"""Golden fixture for mixtune's MiniGPT-4 port, from PaddleMIX's own minigpt4 implementation (PaddlePaddle, CPU).

Builds PaddleMIX's MiniGPT4ForConditionalGeneration tiny (BLIP-2 ViT + Q-Former, language_projection, PaddleNLP's
Llama), sets every parameter to random int8 values times a power of two (exact in fp32, small to store), runs one
fixed input (one image, PaddleMIX's first / second prompt ids around it, then a labelled reply), and saves the
weights under the key names mixtune's loader reads (torch layout), the inputs, the logits and PaddleMIX's loss."""
import json
import os
import sys
import types

import numpy as np
import paddle

# Run from a folder holding PaddleMIX's source (paddlemix/models/minigpt4, models/model_utils.py, activations.py,
# utils/):   /path/to/paddle_venv/bin/python make_golden_paddlemix.py OUT_DIR
ROOT = os.getcwd()
for name, path in (("paddlemix", "paddlemix"), ("paddlemix.models", "paddlemix/models")):
    # empty packages: PaddleMIX's own __init__ files import every model, and one of them fails on Python 3.11
    mod = types.ModuleType(name)
    mod.__path__ = [os.path.join(ROOT, path)]
    sys.modules[name] = mod
from paddlemix.models.minigpt4.configuration import MiniGPT4Config  # noqa: E402
from paddlemix.models.minigpt4.modeling import MiniGPT4ForConditionalGeneration  # noqa: E402

OUT = sys.argv[1]
V, H, Q = 96, 64, 8  # vocabulary, language model width, query tokens
IMAGE = 56
vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE,
              patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True)
qformer = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu",
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12,
               cross_attention_frequency=2, max_position_embeddings=512)
text = dict(model_type="llama", vocab_size=V, hidden_size=H, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
            max_position_embeddings=512, tie_word_embeddings=False, hidden_act="silu",
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
config = MiniGPT4Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=Q)
paddle.seed(0)
model = MiniGPT4ForConditionalGeneration(config)
model.eval()

rng = np.random.default_rng(0)


def mixtune_name(name):
    # PaddleNLP's Llama is `llama.*`; transformers' (which mixtune loads) is `model.*`
    return name.replace("language_model.llama.", "language_model.model.")


weights = {}
for name, p in model.named_parameters():
    shape = p.shape
    q = rng.integers(-63, 64, size=shape).astype(np.int8)
    last = name.split(".")[-2] if "." in name else name
    is_norm = name.endswith(".weight") and len(shape) == 1 and ("norm" in last.lower())
    offset, scale = (1.0, 2.0 ** -8) if is_norm else (0.0, 2.0 ** -7 if len(shape) == 1 else 2.0 ** -8)
    if name.endswith("embed_tokens.weight"):
        scale = 2.0 ** -5
    value = offset + q.astype(np.float32) * np.float32(scale)
    p.set_value(paddle.to_tensor(value, dtype="float32"))
    key = mixtune_name(name)
    # paddle Linear weights (lm_head included) are (in, out); torch's are (out, in)
    transpose = len(shape) == 2 and not name.endswith("embed_tokens.weight")
    weights[key] = (q.T.copy() if transpose else q, np.float32(offset), np.float32(scale))
    print(f"{name:70s} -> {key:70s} {list(shape)} {'T' if transpose else ''}")

# PaddleMIX's processor: the prompt before <ImageHere> with BOS, the rest after it, then the reply (labels)
first = np.array([[1] + list(rng.integers(3, V, size=6))], dtype=np.int64)
second = np.array([list(rng.integers(3, V, size=9))], dtype=np.int64)
reply = np.array([list(rng.integers(3, V, size=5)) + [2]], dtype=np.int64)
pix_q = rng.integers(-127, 128, size=(1, 3, IMAGE, IMAGE)).astype(np.int8)
pixels = pix_q.astype(np.float32) / 64
with paddle.no_grad():
    out = model(pixel_values=paddle.to_tensor(pixels), first_input_ids=paddle.to_tensor(first),
                second_input_ids=paddle.to_tensor(second), labels=paddle.to_tensor(reply),
                masked_labels=paddle.to_tensor(reply), return_dict=True)
logits = out.logits.numpy()
loss = float(out.loss.numpy())
print("logits", logits.shape, float(np.abs(logits).mean()), "loss", loss)

arrays = {"first_input_ids": first.astype(np.int16), "second_input_ids": second.astype(np.int16),
          "reply_ids": reply.astype(np.int16), "pixels_q": pix_q, "pixels_scale": np.float32(1 / 64),
          "logits": logits.astype(np.float32), "loss": np.float32(loss)}
for key, (q, offset, scale) in weights.items():
    arrays[f"w:{key}"] = q
    arrays[f"offset:{key}"] = offset
    arrays[f"scale:{key}"] = scale
np.savez_compressed(os.path.join(OUT, "golden.npz"), **arrays)
# mixtune's config.json: PaddleMIX's keys; the image token is one id past the vocabulary (never looked up)
with open(os.path.join(OUT, "config.json"), "w") as f:
    json.dump({"model_type": "minigpt4", "architectures": ["MiniGPT4ForConditionalGeneration"],
               "vision_config": vision, "qformer_config": qformer, "text_config": text, "num_query_tokens": Q,
               "image_token_index": V}, f, indent=1)
print("saved", os.path.getsize(os.path.join(OUT, "golden.npz")))
