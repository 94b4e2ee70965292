"""PaddleMIX's names for VisualGLM-6B's modules and parameters.

This port keeps the published (SwissArmyTransformer) names; PaddleMIX's visualglm renamed the image side
(`vision_model` with `self_attn.qkv` / `projection` / `fc1` / `fc2`, `qformer.encoder.layer.N` with separate
`query` / `key` / `value`, `query_tokens`, `language_projection`) and keeps ChatGLM-6B under
`language_model.chatglm`. PaddleMIX's configs select by those names (`freeze_include: ["*vision_model*"]`, LoRA
`.*dense.*`): mixtune reads their patterns through this map (`mixtune.paddle_compat.read_as_paddlemix`), so they
select the same modules here as there. A fused published module answers to each PaddleMIX part it holds.
"""

from __future__ import annotations

import re

VIT, QF = r"^image_encoder\.vit\.", r"^image_encoder\.qformer\.transformer\."
RENAMES = (  # (regex over our name, PaddleMIX replacement(s)), first match wins
    (r"^transformer\.", ("language_model.chatglm.transformer.",)),
    (r"^lm_head", ("language_model.lm_head",)),
    (r"^image_encoder\.glm_proj", ("language_projection",)),
    (VIT + r"transformer\.word_embeddings(\.weight)?$", ("vision_model.embeddings.class_embedding",)),
    (VIT + r"transformer\.position_embeddings(\.weight)?$", ("vision_model.embeddings.position_embedding",)),
    (VIT + r"mixins\.patch_embedding\.proj", ("vision_model.embeddings.patch_embedding",)),
    (VIT + r"mixins\.cls\.ln_vision", ("vision_model.post_layernorm",)),
    (VIT + r"transformer\.layers\.(\d+)\.input_layernorm", (r"vision_model.encoder.layers.\1.layer_norm1",)),
    (VIT + r"transformer\.layers\.(\d+)\.post_attention_layernorm",
     (r"vision_model.encoder.layers.\1.layer_norm2",)),
    (VIT + r"transformer\.layers\.(\d+)\.attention\.query_key_value",
     (r"vision_model.encoder.layers.\1.self_attn.qkv",)),
    (VIT + r"transformer\.layers\.(\d+)\.attention\.dense", (r"vision_model.encoder.layers.\1.self_attn.projection",)),
    (VIT + r"transformer\.layers\.(\d+)\.mlp\.dense_h_to_4h", (r"vision_model.encoder.layers.\1.mlp.fc1",)),
    (VIT + r"transformer\.layers\.(\d+)\.mlp\.dense_4h_to_h", (r"vision_model.encoder.layers.\1.mlp.fc2",)),
    (QF + r"word_embeddings(\.weight)?$", ("query_tokens",)),
    (QF + r"final_layernorm", ("qformer.final_layernorm",)),
    (QF + r"layers\.(\d+)\.input_layernorm", (r"qformer.encoder.layer.\1.input_layernorm",)),
    (QF + r"layers\.(\d+)\.attention\.query_key_value", tuple(rf"qformer.encoder.layer.\1.attention.attention.{p}"
                                                            for p in ("query", "key", "value"))),
    (QF + r"layers\.(\d+)\.attention\.dense", (r"qformer.encoder.layer.\1.attention.output.dense",)),
    (QF + r"layers\.(\d+)\.post_attention_layernorm", (r"qformer.encoder.layer.\1.attention.output.LayerNorm",)),
    (QF + r"layers\.(\d+)\.cross_attention\.query", (r"qformer.encoder.layer.\1.crossattention.attention.query",)),
    (QF + r"layers\.(\d+)\.cross_attention\.key_value", tuple(rf"qformer.encoder.layer.\1.crossattention.attention.{p}"
                                                             for p in ("key", "value"))),
    (QF + r"layers\.(\d+)\.cross_attention\.dense", (r"qformer.encoder.layer.\1.crossattention.output.dense",)),
    (QF + r"layers\.(\d+)\.post_cross_attention_layernorm",
     (r"qformer.encoder.layer.\1.crossattention.output.LayerNorm",)),
    (QF + r"layers\.(\d+)\.mlp\.dense_h_to_4h", (r"qformer.encoder.layer.\1.intermediate_query.dense",)),
    (QF + r"layers\.(\d+)\.mlp\.dense_4h_to_h", (r"qformer.encoder.layer.\1.output_query.dense",)),
)
_COMPILED = tuple((re.compile(rx), new) for rx, new in RENAMES)


def paddlemix_names(name: str) -> tuple[str, ...]:
    """PaddleMIX's name(s) for one of our parameter or leaf-module names (the parameter suffix kept); () for
    containers PaddleMIX has no counterpart of."""
    for rx, new in _COMPILED:
        m = rx.match(name)
        if m:
            rest = name[m.end():]
            if rx.pattern.endswith("$"):  # the whole parameter is one PaddleMIX parameter
                return new
            return tuple(m.expand(n) + rest for n in new)
    return ()
