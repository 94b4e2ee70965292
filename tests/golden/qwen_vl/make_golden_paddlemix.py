"""Golden fixture for mixtune's Qwen-VL port, from PaddleMIX's own qwen_vl implementation (PaddlePaddle, CPU).

Builds PaddleMIX's QWenLMHeadModel tiny, sets every parameter to random int8 values times a power of two (exact in
fp32, and small to store), runs one fixed batch (two samples, one image each), and saves the weights under the
published Qwen-VL key names (torch layout), the inputs, the logits and a label loss."""
import json
import os
import sys
import tempfile
import types

import numpy as np
import paddle

# Run from a folder holding PaddleMIX's source (paddlemix/models/qwen_vl, groundingdino, model_utils.py, utils/):
#   /path/to/paddle_venv/bin/python make_golden_paddlemix.py OUT_DIR
ROOT = os.getcwd()
for name, path in (("paddlemix", "paddlemix"), ("paddlemix.models", "paddlemix/models")):
    # empty packages: PaddleMIX's own __init__ files import every model, and one of them fails on Python 3.11
    mod = types.ModuleType(name)
    mod.__path__ = [os.path.join(ROOT, path)]
    sys.modules[name] = mod
from paddlemix.models.qwen_vl.modeling import QWenLMHeadModel  # noqa: E402

# PaddleMIX's qwen_vl was written for Paddle 2.x, where paddle.where(cond) returns (N, 1) index columns;
# Paddle 3 returns (N,) vectors. Restore the 2.x shape for that one call form (no model arithmetic changes).
_where = paddle.where
def _where_2x(condition, x=None, y=None, name=None):
    if x is None and y is None:
        return tuple(t.reshape([-1, 1]) for t in _where(condition))
    return _where(condition, x, y, name)
paddle.where = _where_2x
from paddlenlp.transformers import QWenConfig  # noqa: E402

OUT = sys.argv[1]
V, H, HEADS, LAYERS, INTER = 128, 128, 4, 2, 256
IMG_START = V - 3  # </img> = V-2, pad V-1
visual = {"image_size": 56, "patch_size": 14, "width": 64, "layers": 2, "heads": 4, "mlp_ratio": 2.0,
          "output_dim": H, "image_start_id": IMG_START}
llm = dict(vocab_size=V, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, kv_channels=H // HEADS,
           intermediate_size=INTER, rotary_emb_base=10000, seq_length=2048, layer_norm_epsilon=1e-6,
           use_dynamic_ntk=True, use_logn_attn=True, no_bias=True, tie_word_embeddings=False,
           max_position_embeddings=8192)
LLM_DIR = tempfile.mkdtemp()  # PaddleMIX's QWen wrapper builds its language model from a config folder
with open(os.path.join(LLM_DIR, "config.json"), "w") as f:
    json.dump({"model_type": "qwen", "architectures": ["QWenModel"], **llm}, f)
config = QWenConfig(**llm, visual=visual, llm_pretrained_model_name_or_path=LLM_DIR)
config.dtype = "float32"
paddle.seed(0)
model = QWenLMHeadModel(config)
model.eval()

rng = np.random.default_rng(0)
def original_name(name):
    for a, b in (("visual.vit.", "transformer.visual."), ("visual.", "transformer.visual."),
                 ("transformer.llm.", "transformer.")):
        if name.startswith(a):
            return b + name[len(a):]
    return name

weights = {}
for name, p in model.named_parameters():
    shape = p.shape
    q = rng.integers(-63, 64, size=shape).astype(np.int8)
    is_norm = (name.endswith(".weight") and len(shape) == 1 and ("ln" in name.split(".")[-2] or "norm" in name))
    offset, scale = (1.0, 2.0 ** -8) if is_norm else (0.0, 2.0 ** -7 if len(shape) == 1 else 2.0 ** -8)
    if name.endswith("wte.weight"):
        scale = 2.0 ** -5
    value = offset + q.astype(np.float32) * np.float32(scale)
    p.set_value(paddle.to_tensor(value, dtype="float32"))
    key = original_name(name)
    # paddle Linear / MultiHeadAttention weights are (in, out); torch's are (out, in)
    transpose = len(shape) == 2 and not (key.endswith(("wte.weight", "positional_embedding", "pos_embed", "query"))
                                         or key.endswith("visual.proj"))
    weights[key] = (q.T.copy() if transpose else q, np.float32(offset), np.float32(scale))
    print(f"{name:60s} -> {key:60s} {list(shape)} {'T' if transpose else ''}")

L1, L2 = 8, 12  # text tokens before / after the image, then sample 2 places its image elsewhere
n = 256
def sample(before, after):
    ids = list(rng.integers(0, V - 3, size=before)) + [IMG_START] + [V - 1] * n + [IMG_START + 1] + \
        list(rng.integers(0, V - 3, size=after))
    return ids
ids = np.array([sample(3, 18), sample(15, 6)], dtype=np.int64)
pix_q = rng.integers(-127, 128, size=(2, 3, 56, 56)).astype(np.int8)
pixels = pix_q.astype(np.float32) / 64
labels = np.full_like(ids, -100)
labels[:, -6:] = ids[:, -6:]  # the last 6 tokens of each sample are the "reply"
with paddle.no_grad():
    out = model(input_ids=paddle.to_tensor(ids), images=paddle.to_tensor(pixels), return_dict=True)
    logits = out.logits.numpy()
    loss = model(input_ids=paddle.to_tensor(ids), images=paddle.to_tensor(pixels), labels=paddle.to_tensor(labels),
                 return_dict=True).loss.numpy()
print("logits", logits.shape, float(np.abs(logits).mean()), "loss", float(loss))

arrays = {"input_ids": ids.astype(np.int16), "labels": labels.astype(np.int16), "pixels_q": pix_q,
          "pixels_scale": np.float32(1 / 64), "logits": logits.astype(np.float32), "loss": np.float32(loss)}
for key, (q, offset, scale) in weights.items():
    arrays[f"w:{key}"] = q
    arrays[f"offset:{key}"] = offset
    arrays[f"scale:{key}"] = scale
np.savez_compressed(os.path.join(OUT, "golden.npz"), **arrays)
with open(os.path.join(OUT, "config.json"), "w") as f:
    json.dump({"model_type": "qwen", **llm, "visual": visual, "architectures": ["QWenLMHeadModel"]}, f, indent=1)
print("saved", os.path.getsize(os.path.join(OUT, "golden.npz")))
