"""Golden fixture for mixtune's VisualGLM-6B port, from PaddleMIX's own visualglm implementation (PaddlePaddle, CPU).

Builds PaddleMIX's VisualGLMForConditionalGeneration tiny (its EVA ViT, Q-Former and language projection, with
PaddleNLP's ChatGLM-6B as the language model), sets every parameter to random int8 values times a power of two
(exact in fp32, small to store), runs one fixed input (one image, a prompt, [gMASK] <sop>, a reply, <eop>) and saves
the weights under the published VisualGLM-6B key names (torch layout; PaddleMIX's separate Q-Former query / key /
value are fused into the published `query_key_value` / `key_value`), the input, the logits and a label loss."""
import json
import os
import sys
import types

import numpy as np
import paddle

# Run from a folder holding PaddleMIX's source (paddlemix/models/visualglm, models/model_utils.py, activations.py,
# utils/):  /path/to/paddle_venv/bin/python make_golden_paddlemix.py OUT_DIR
ROOT = os.getcwd()
for name, path in (("paddlemix", "paddlemix"), ("paddlemix.models", "paddlemix/models")):
    # empty packages: PaddleMIX's own __init__ files import every model, and one of them fails on Python 3.11
    mod = types.ModuleType(name)
    mod.__path__ = [os.path.join(ROOT, path)]
    sys.modules[name] = mod
from paddlemix.models.visualglm.configuration import VisualGLMConfig  # noqa: E402
from paddlemix.models.visualglm.modeling import VisualGLMForConditionalGeneration  # noqa: E402

OUT = sys.argv[1]
V, H, HEADS, LAYERS, INNER = 128, 64, 4, 2, 128
UNK, PAD, MASK, GMASK, IMG_START, SOP, EOP = 0, 3, 120, 121, 122, 124, 125
Q = 32  # PaddleMIX's forward splits 32 image positions after each image start
vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=14, layer_norm_eps=1e-5, dropout=0.0, attention_dropout=0.0, hidden_act="gelu",
              image_start_id=IMG_START)
qformer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, cross_attention_frequency=2,
               layer_norm_eps=1e-12, hidden_act="gelu")
text = dict(model_type="chatglm", vocab_size=V, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            inner_hidden_size=INNER, layernorm_epsilon=1e-5, bos_token_id=SOP, eos_token_id=EOP, pad_token_id=PAD,
            mask_token_id=MASK, gmask_token_id=GMASK, position_encoding_2d=True, max_sequence_length=256)
config = VisualGLMConfig(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=Q)
config.dtype = "float32"
config.qformer_config.dtype = "float32"
paddle.seed(0)
model = VisualGLMForConditionalGeneration(config)
model.eval()

rng = np.random.default_rng(0)


def published(name):
    """PaddleMIX's parameter name -> (published key, kind) with kind "T" (paddle (in, out) -> torch (out, in)),
    "fuse:i/n" (part i of n of a fused published Linear), or "" (as is)."""
    r = name
    for a, b in (("vision_model.embeddings.class_embedding", "image_encoder.vit.transformer.word_embeddings.weight"),
                 ("vision_model.embeddings.position_embedding",
                  "image_encoder.vit.transformer.position_embeddings.weight"),
                 ("vision_model.embeddings.patch_embedding.", "image_encoder.vit.mixins.patch_embedding.proj."),
                 ("vision_model.post_layernorm.", "image_encoder.vit.mixins.cls.ln_vision."),
                 ("vision_model.encoder.layers.", "image_encoder.vit.transformer.layers."),
                 ("query_tokens", "image_encoder.qformer.transformer.word_embeddings.weight"),
                 ("qformer.final_layernorm.", "image_encoder.qformer.transformer.final_layernorm."),
                 ("qformer.encoder.layer.", "image_encoder.qformer.transformer.layers."),
                 ("language_projection.", "image_encoder.glm_proj."),
                 ("language_model.chatglm.transformer.", "transformer.")):
        if r.startswith(a):
            r = b + r[len(a):]
            break
    for a, b in ((".self_attn.qkv.", ".attention.query_key_value."), (".self_attn.projection.", ".attention.dense."),
                 (".layer_norm1.", ".input_layernorm."), (".layer_norm2.", ".post_attention_layernorm."),
                 (".mlp.fc1.", ".mlp.dense_h_to_4h."), (".mlp.fc2.", ".mlp.dense_4h_to_h."),
                 (".attention.output.dense.", ".attention.dense."),
                 (".attention.output.LayerNorm.", ".post_attention_layernorm."),
                 (".crossattention.attention.query.", ".cross_attention.query."),
                 (".crossattention.output.dense.", ".cross_attention.dense."),
                 (".crossattention.output.LayerNorm.", ".post_cross_attention_layernorm."),
                 (".intermediate_query.dense.", ".mlp.dense_h_to_4h."),
                 (".output_query.dense.", ".mlp.dense_4h_to_h.")):
        r = r.replace(a, b)
    fuse = ""
    for part, (a, b, n) in enumerate(((".attention.attention.query.", ".attention.query_key_value.", 3),
                                      (".attention.attention.key.", ".attention.query_key_value.", 3),
                                      (".attention.attention.value.", ".attention.query_key_value.", 3),
                                      (".crossattention.attention.key.", ".cross_attention.key_value.", 2),
                                      (".crossattention.attention.value.", ".cross_attention.key_value.", 2))):
        if a in r:
            r, fuse = r.replace(a, b), f"fuse:{part % 3 if n == 3 else part - 3}/{n}"
    return r, fuse


parts = {}
for name, p in model.named_parameters():
    shape = p.shape
    q = rng.integers(-63, 64, size=shape).astype(np.int8)
    key, fuse = published(name)
    is_norm = key.endswith(".weight") and len(shape) == 1
    offset, scale = (1.0, 2.0 ** -8) if is_norm else (0.0, 2.0 ** -7 if len(shape) == 1 else 2.0 ** -8)
    if key.endswith(("word_embeddings.weight", "position_embeddings.weight")):
        scale = 2.0 ** -5
    p.set_value(paddle.to_tensor(offset + q.astype(np.float32) * np.float32(scale), dtype="float32"))
    stored = q
    if key.endswith(("word_embeddings.weight", "position_embeddings.weight")) and len(shape) == 3:
        stored = q.reshape(shape[1], shape[2])  # (1, n, D) paddle parameters; published Embedding tables are (n, D)
    elif len(shape) == 2 and not key.endswith(("word_embeddings.weight", "position_embeddings.weight")):
        stored = q.T.copy()  # paddle Linear weights are (in, out); torch's are (out, in)
    parts.setdefault(key, []).append((fuse, stored, np.float32(offset), np.float32(scale)))
    print(f"{name:70s} -> {key:70s} {list(shape)} {fuse}")

weights = {}
for key, items in parts.items():
    items.sort(key=lambda t: t[0])
    assert len({(o, s) for _, _, o, s in items}) == 1, key
    weights[key] = (np.concatenate([t[1] for t in items], axis=0), items[0][2], items[0][3])

ids = [IMG_START] + [UNK] * Q + list(rng.integers(5, MASK, size=10)) + [GMASK, SOP] + \
    list(rng.integers(5, MASK, size=6)) + [EOP]
ids = np.array([ids], dtype=np.int64)
context = int(np.where(ids[0] == SOP)[0][0])
labels = np.full_like(ids, -100)
labels[:, context + 1:] = ids[:, context + 1:]  # the reply and <eop>
shifted = np.full_like(labels, -100)  # PaddleNLP's ChatGLM loss does not shift: the data pipeline does
shifted[:, :-1] = labels[:, 1:]
pix_q = rng.integers(-127, 128, size=(1, 3, 28, 28)).astype(np.int8)
pixels = pix_q.astype(np.float32) / 64
with paddle.no_grad():
    out = model(input_ids=paddle.to_tensor(ids), images=paddle.to_tensor(pixels), return_dict=True)
    logits = out.logits.numpy()
    loss = model(input_ids=paddle.to_tensor(ids), images=paddle.to_tensor(pixels), labels=paddle.to_tensor(shifted),
                 return_dict=True).loss.numpy()
print("logits", logits.shape, float(np.abs(logits).mean()), "loss", float(loss))

arrays = {"input_ids": ids.astype(np.int16), "labels": labels.astype(np.int16), "pixels_q": pix_q,
          "pixels_scale": np.float32(1 / 64), "logits": logits.astype(np.float32), "loss": np.float32(loss)}
for key, (q, offset, scale) in weights.items():
    arrays[f"w:{key}"] = q
    arrays[f"offset:{key}"] = offset
    arrays[f"scale:{key}"] = scale
np.savez_compressed(os.path.join(OUT, "golden.npz"), **arrays)
eva = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "vocab_size": 1, "layernorm_order": "pre",
       "max_sequence_length": 5, "inner_hidden_size": 64, "use_final_layernorm": False, "layernorm_epsilon": 1e-5,
       "image_size": [28, 28], "pre_len": 1, "post_len": 0, "in_channels": 3, "num_classes": 0, "patch_size": 14,
       "hidden_act": "gelu", "ln_vision_eps": 1e-5}  # PaddleMIX: exact GELU, one epsilon for every ViT norm
qf = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "vocab_size": Q, "layernorm_order": "post",
      "inner_hidden_size": 64,
      "max_sequence_length": 0, "is_decoder": [True, False], "cross_attn_hidden_size": 32, "layernorm_epsilon": 1e-12}
with open(os.path.join(OUT, "config.json"), "w") as f:
    json.dump({"model_type": "chatglm", "architectures": ["ChatGLMModel"], "vocab_size": V, "hidden_size": H,
               "num_layers": LAYERS, "num_attention_heads": HEADS, "inner_hidden_size": INNER,
               "layernorm_epsilon": 1e-5, "bos_token_id": SOP, "eos_token_id": EOP, "pad_token_id": PAD,
               "mask_token_id": MASK, "gmask_token_id": GMASK, "position_encoding_2d": True,
               "max_sequence_length": 256, "image_token_id": UNK, "image_length": Q, "eva_config": eva,
               "qformer_config": qf}, f, indent=1)
print("saved", os.path.getsize(os.path.join(OUT, "golden.npz")))
