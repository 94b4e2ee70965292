"""Golden fixtures for mixtune's CogVLM and CogAgent ports, from PaddleMIX's own cogvlm implementation
(paddlemix/models/cogvlm: CogModelForCausalLM, which serves both model_types; PaddlePaddle, CPU).

Builds PaddleMIX's model tiny, sets every parameter to random int8 values times a power of two (exact in fp32,
and small to store), runs one fixed batch (CogVLM: two samples, one image each, at different places; CogAgent:
one sample, see below), and saves the weights under the published key names (torch layout), the inputs, the
logits and a label loss.

Run from a folder holding PaddleMIX's source (paddlemix/models/cogvlm):
    /path/to/paddle_venv/bin/python make_golden_paddlemix.py cogvlm OUT_DIR
    /path/to/paddle_venv/bin/python make_golden_paddlemix.py cogagent OUT_DIR

Two shims, neither touching the model's arithmetic:
- `paddle.incubate.nn.memory_efficient_attention` has no CPU kernel in PaddlePaddle 3.3.1 ("kernel not
  registered"); it is replaced by the formula it computes, softmax(q k^T * scale) v over (batch, seq, heads, dim)
  inputs (no bias, no dropout: how both vision towers call it).
- CogAgent's high-resolution tower (Eva2LargeEncoder) hard-codes EVA-CLIP-L's sizes (24 layers, width 1024);
  its config dict is set to tiny sizes (3 layers, width 32, 16-wide heads) before the tower is built.
"""
import json
import os
import sys
import types

import numpy as np
import paddle

ROOT = os.getcwd()
for name, path in (("paddlemix", "paddlemix"), ("paddlemix.models", "paddlemix/models")):
    # empty packages: PaddleMIX's own __init__ files import every model
    mod = types.ModuleType(name)
    mod.__path__ = [os.path.join(ROOT, path)]
    sys.modules[name] = mod
import paddlemix.models.cogvlm.visual as visual  # noqa: E402


def memory_efficient_attention(q, k, v, p=0.0, scale=None, **_):
    q, k, v = (t.transpose([0, 2, 1, 3]) for t in (q, k, v))  # (B, S, H, D) -> (B, H, S, D)
    weights = paddle.nn.functional.softmax(paddle.matmul(q, k, transpose_y=True) * scale, axis=-1)
    return paddle.matmul(weights, v).transpose([0, 2, 1, 3])


visual.memory_efficient_attention = memory_efficient_attention

CROSS = {"layers": 3, "width": 32, "head_width": 16, "mlp_ratio": 2.6667, "patch_size": 14, "pt_hw_seq_len": 16}
_eva_init = visual.Eva2LargeEncoder.__init__


def _tiny_eva_init(self, image_size=224):
    paddle.nn.Layer.__init__(self)
    self.config = {"embed_dim": 768, "vision_cfg": {
        "image_size": image_size, "layers": CROSS["layers"], "width": CROSS["width"], "drop_path_rate": 0,
        "head_width": CROSS["head_width"], "mlp_ratio": CROSS["mlp_ratio"], "patch_size": CROSS["patch_size"],
        "eva_model_name": "eva-clip-l-14-336", "xattn": True, "fusedLN": True, "rope": True,
        "pt_hw_seq_len": CROSS["pt_hw_seq_len"], "intp_freq": True, "naiveswiglu": True, "subln": True}}
    os.environ["delRoPE"] = "1"
    self.model = visual._build_vision_tower(**self.config)


visual.Eva2LargeEncoder.__init__ = _tiny_eva_init
from paddlemix.models.cogvlm.configuration import CogModelConfig  # noqa: E402
from paddlemix.models.cogvlm.modeling import CogModelForCausalLM  # noqa: E402

MODEL_TYPE, OUT = sys.argv[1], sys.argv[2]
V, H, HEADS, LAYERS, INTER = 128, 64, 4, 2, 128
IMAGE, PATCH = 56, 14
vision = {"dropout_prob": 0.0, "hidden_act": "gelu", "hidden_size": 32, "image_size": IMAGE, "in_channels": 3,
          "intermediate_size": 64, "layer_norm_eps": 1e-06, "num_heads": 2, "num_hidden_layers": 2,
          "num_positions": (IMAGE // PATCH) ** 2 + 1, "patch_size": PATCH}
llm = dict(vocab_size=V, hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
           hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-05, template_version="chat",
           pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
cross = dict(cross_image_size=56, cross_hidden_size=CROSS["width"], cross_compute_hidden_size=CROSS["width"])
config = CogModelConfig(**llm, **cross, vision_config=vision, model_type=MODEL_TYPE)
config.dtype = "float32"
paddle.seed(0)
model = CogModelForCausalLM(config)
model.eval()

rng = np.random.default_rng(0 if MODEL_TYPE == "cogvlm" else 1)
weights = {}
for name, p in model.named_parameters():
    if MODEL_TYPE == "cogvlm" and ".cross_vision." in name:
        continue  # PaddleMIX builds the CogAgent tower for CogVLM too; CogVLM never reads it (and has no such keys)
    shape = p.shape
    q = rng.integers(-63, 64, size=shape).astype(np.int8)
    leaf = name.split(".")[-2] if len(name.split(".")) > 1 else ""
    is_norm = len(shape) == 1 and name.endswith(".weight") and ("norm" in leaf or leaf.startswith("ln"))
    offset, scale = (1.0, 2.0 ** -8) if is_norm else (0.0, 2.0 ** -7 if len(shape) == 1 else 2.0 ** -8)
    if name.endswith("embed_tokens.weight"):
        scale = 2.0 ** -5
    value = offset + q.astype(np.float32) * np.float32(scale)
    p.set_value(paddle.to_tensor(value, dtype="float32"))
    # paddle Linear weights are (in, out); torch's are (out, in). Conv and embedding tables have the same layout.
    is_linear = len(shape) == 2 and not name.endswith(("embed_tokens.weight", "position_embedding.weight",
                                                       "cls_embedding", "pos_embed"))
    weights[name] = (q.T.copy() if is_linear else q, np.float32(offset), np.float32(scale))
    print(f"{name:75s} {list(shape)} {'T' if is_linear else ''}")

n_img = (IMAGE // PATCH) ** 2 + 2


def sample(before, after):  # BOS, `before` text tokens, the image's positions, `after` text tokens
    ids = [1] + list(rng.integers(3, V, size=before)) + [0] * n_img + list(rng.integers(3, V, size=after))
    types_ = [0] * (1 + before) + [1] * n_img + [0] * after
    return ids, types_


(a, ta), (b, tb) = sample(0, 12), sample(5, 7)
ids, token_types = np.array([a, b], dtype=np.int64), np.array([ta, tb], dtype=np.int64)
pix_q = rng.integers(-127, 128, size=(2, 3, IMAGE, IMAGE)).astype(np.int8)
cross_q = rng.integers(-127, 128, size=(2, 3, 56, 56)).astype(np.int8)
pixels, cross_pixels = pix_q.astype(np.float32) / 64, cross_q.astype(np.float32) / 64
if MODEL_TYPE == "cogagent":
    # one row: PaddleMIX's default cross-attention mask, ones of shape (batch, 1), is added to the (batch, heads,
    # length, patches) scores, which broadcasts only for a batch of one (as in the published code)
    ids, token_types, pix_q, cross_q = ids[1:], token_types[1:], pix_q[1:], cross_q[1:]
    pixels, cross_pixels = pixels[1:], cross_pixels[1:]
labels = np.full_like(ids, -100)
labels[:, -5:] = ids[:, -5:]  # the last 5 tokens of each sample are the "reply"


def run(with_labels):
    rows = range(len(ids))
    images = [[paddle.to_tensor(pixels[i])] for i in rows]
    cross_images = [[paddle.to_tensor(cross_pixels[i])] for i in rows] if MODEL_TYPE == "cogagent" else None
    return model(input_ids=paddle.to_tensor(ids), images=images, cross_images=cross_images,
                 token_type_ids=paddle.to_tensor(token_types),
                 labels=paddle.to_tensor(labels) if with_labels else None, return_dict=True)


with paddle.no_grad():
    logits = run(False).logits.numpy()
    loss = run(True).loss.numpy()
print("logits", logits.shape, float(np.abs(logits).mean()), "loss", float(loss))

arrays = {"input_ids": ids.astype(np.int16), "token_type_ids": token_types.astype(np.int8),
          "labels": labels.astype(np.int16), "pixels_q": pix_q, "pixels_scale": np.float32(1 / 64),
          "logits": logits.astype(np.float32), "loss": np.float32(loss)}
if MODEL_TYPE == "cogagent":
    arrays["cross_pixels_q"] = cross_q
for key, (q, offset, scale) in weights.items():
    arrays[f"w:{key}"] = q
    arrays[f"offset:{key}"] = offset
    arrays[f"scale:{key}"] = scale
np.savez_compressed(os.path.join(OUT, "golden.npz"), **arrays)
saved = {"model_type": MODEL_TYPE, **llm, "vision_config": vision,
         "architectures": ["CogAgentForCausalLM" if MODEL_TYPE == "cogagent" else "CogVLMForCausalLM"]}
if MODEL_TYPE == "cogagent":
    saved.update(cross, cross_vision_config={k: CROSS[k] for k in ("layers", "head_width", "mlp_ratio", "patch_size",
                                                                   "pt_hw_seq_len")})
with open(os.path.join(OUT, "config.json"), "w") as f:
    json.dump(saved, f, indent=1)
print("saved", os.path.getsize(os.path.join(OUT, "golden.npz")))
