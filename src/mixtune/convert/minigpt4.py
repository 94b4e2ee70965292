"""`mixtune convert --from minigpt4`: one MiniGPT-4 folder from the released pieces, as PaddleMIX's
examples/minigpt4/merge_weight.py merges them:

- BLIP-2's ViT and Q-Former, either a folder in transformers' layout (e.g. Salesforce/blip2-flan-t5-xxl: its
  `vision_model.*` (EVA ViT-g), `qformer.*` and `query_tokens` are kept, its language model is not), or LAVIS's
  released checkpoint as Vision-CAIR's MiniGPT-4 loads it (blip2_pretrained_flant5xxl.pth: `visual_encoder.*`,
  `ln_vision`, `Qformer.bert.*`, `query_tokens`; its ViT, when the file lacks it, from eva_vit_g.pth), renamed
  as transformers' BLIP-2 conversion renames them;
- a Vicuna / Llama folder (transformers' layout: config.json, weights, tokenizer): under `language_model.`;
- MiniGPT-4's released checkpoint (e.g. pretrained_minigpt4.pth, `{"model": {...}}`): `llama_proj.*` becomes
  `language_projection.*`, and any `llama_model.*` it carries replaces the Vicuna's tensors of that name.

The tokenizer gains `<ImageHere>`; its id lies past the Llama's vocabulary, which is not resized (the model puts
the image's vectors at those positions and never looks the id up). Weights are copied one source shard at a time,
in their own dtype, and every key the model expects is checked to be written."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch
from safetensors.torch import load_file, save_file

from mixtune.errors import MixtuneError

BLIP2_PREFIXES = ("vision_model.", "qformer.", "query_tokens")
# LAVIS's names -> transformers' BLIP-2 names (what transformers' own BLIP-2 conversion renames)
LAVIS_VISION = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
                "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
                "patch_embed.proj.bias": "embeddings.patch_embedding.bias"}
LAVIS_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
               "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
# the Q-Former's query branch; its text branch (`intermediate`, `output`, word embeddings, `cls`) is unused
QFORMER_QUERY_PARTS = ("attention.", "crossattention.", "intermediate_query.", "output_query.")


def weight_files(path: str) -> list[str]:
    """The weight files of a checkpoint folder (safetensors first, else PyTorch .bin), or the file itself."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise MixtuneError(f"{path}: no such file or folder")
    for pattern in ("*.safetensors", "pytorch_model*.bin", "*.pth", "*.pt"):
        files = sorted(glob.glob(os.path.join(path, pattern)))
        if files:
            return files
    raise MixtuneError(f"{path}: no weights (*.safetensors, pytorch_model*.bin, *.pth)")


def read_weights(file: str) -> dict[str, torch.Tensor]:
    if file.endswith(".safetensors"):
        return load_file(file)
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # MiniGPT-4 / LAVIS: {"model": ...}
        state = state["model"]
    if not isinstance(state, dict):
        raise MixtuneError(f"{file}: not a state dict")
    return state


def read_config(folder: str, what: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise MixtuneError(f"{path}: missing (--{what} must be a transformers checkpoint folder)")
    with open(path) as f:
        return json.load(f)


def lavis_to_blip2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LAVIS BLIP-2 / EVA ViT-g state dict in transformers' BLIP-2 names; what MiniGPT-4 does not use is left out.
    EVA's attention has q and v biases and no k bias: transformers' single qkv bias holds (q, 0, v)."""
    out, biases = {}, {}
    for key, value in state.items():
        if key in ("ln_vision.weight", "ln_vision.bias"):
            out["vision_model.post_layernorm." + key.rsplit(".", 1)[1]] = value
        elif key == "query_tokens":
            out[key] = value
        elif key.startswith("visual_encoder."):
            name = key.removeprefix("visual_encoder.")
            if name in LAVIS_VISION:
                out["vision_model." + LAVIS_VISION[name]] = value
            elif name.startswith("blocks."):
                _, i, rest = name.split(".", 2)
                if rest in ("attn.q_bias", "attn.v_bias"):
                    biases.setdefault(i, {})[rest[5]] = value
                    continue
                module, param = rest.rsplit(".", 1)
                if module in LAVIS_BLOCK:
                    out[f"vision_model.encoder.layers.{i}.{LAVIS_BLOCK[module]}.{param}"] = value
        elif key.startswith("Qformer.bert.embeddings.LayerNorm."):
            out["qformer.layernorm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("Qformer.bert.encoder.layer."):
            _, i, rest = key.removeprefix("Qformer.bert.encoder.").split(".", 2)
            if rest.startswith(QFORMER_QUERY_PARTS):
                rest = rest.replace("attention.self.", "attention.attention.")
                out[f"qformer.encoder.layer.{i}.{rest}"] = value
    for i, qv in biases.items():
        out[f"vision_model.encoder.layers.{i}.self_attn.qkv.bias"] = torch.cat([qv["q"], torch.zeros_like(qv["v"]),
                                                                               qv["v"]])
    return out


def blip2_parts_config(blip2: str, blip2_config: str | None) -> dict:
    """vision_config, qformer_config, num_query_tokens: from the BLIP-2 folder's config.json, or for a LAVIS file
    from --blip2_config (a folder or config.json) or else BLIP-2's published sizes (transformers' defaults:
    EVA ViT-g's first 39 blocks at 224 px, the 12-layer Q-Former, 32 queries)."""
    if os.path.isdir(blip2) and blip2_config is None:
        blip2_config = blip2
    if blip2_config is None:
        return {}
    path = os.path.join(blip2_config, "config.json") if os.path.isdir(blip2_config) else blip2_config
    if not os.path.isfile(path):
        raise MixtuneError(f"{path}: missing (--blip2 must be a transformers BLIP-2 folder or a LAVIS .pth)")
    with open(path) as f:
        config = json.load(f)
    for key in ("vision_config", "qformer_config"):
        if key not in config:
            raise MixtuneError(f"{path}: no '{key}' (not a BLIP-2 config)")
    return {k: config[k] for k in ("vision_config", "qformer_config", "num_query_tokens") if k in config}


def minigpt4_config(blip2: dict, llama_dir: str, image_token_index: int):
    from mixtune.native.minigpt4 import MiniGPT4Config

    text = read_config(llama_dir, "llama")
    if text.get("model_type") != "llama":
        raise MixtuneError(f"{llama_dir}/config.json: model_type '{text.get('model_type')}', MiniGPT-4 takes a "
                           "Llama / Vicuna ('llama')")
    return MiniGPT4Config(vision_config=blip2.get("vision_config"), qformer_config=blip2.get("qformer_config"),
                          text_config=text, num_query_tokens=blip2.get("num_query_tokens", 32),
                          image_token_index=image_token_index, architectures=["MiniGPT4ForConditionalGeneration"])


def renamed_shards(blip2: str, llama_dir: str, minigpt4_file: str, vit: str | None = None
                   ) -> Iterator[tuple[str, dict]]:
    """(source file, {mixtune key: tensor}) per source shard, in MiniGPT-4's loading order (EVA ViT, BLIP-2,
    Vicuna, MiniGPT-4's checkpoint): a later source's tensor of the same name wins."""
    if vit:
        yield vit, lavis_to_blip2({f"visual_encoder.{k}": v for k, v in read_weights(vit).items()})
    for file in weight_files(blip2):
        state = read_weights(file)
        if any(k.startswith(("visual_encoder.", "Qformer.", "ln_vision.")) for k in state):
            yield file, lavis_to_blip2(state)
        else:
            yield file, {k: v for k, v in state.items() if k.startswith(BLIP2_PREFIXES)}
    for file in weight_files(llama_dir):
        yield file, {f"language_model.{k}": v for k, v in read_weights(file).items()}
    state = read_weights(minigpt4_file)
    if not any(k.startswith("llama_proj.") for k in state):
        raise MixtuneError(f"{minigpt4_file}: no llama_proj.weight / llama_proj.bias (not a MiniGPT-4 checkpoint)")
    out = {}
    for key, value in state.items():
        if key.startswith("llama_proj."):
            out["language_projection." + key.removeprefix("llama_proj.")] = value
        elif key.startswith("llama_model."):
            out["language_model." + key.removeprefix("llama_model.")] = value
    yield minigpt4_file, out


def convert_minigpt4(blip2: str, llama_dir: str, minigpt4_file: str, output_dir: str, vit: str | None = None,
                     blip2_config: str | None = None) -> dict:
    from transformers import AutoTokenizer, GenerationConfig

    from mixtune.models.minigpt4 import CHAT_TEMPLATE
    from mixtune.native.minigpt4 import IMAGE_TOKEN, MiniGPT4ForConditionalGeneration, MiniGPT4Processor
    from mixtune.native.minigpt4.processing_minigpt4 import blip2_image_processor

    tok = AutoTokenizer.from_pretrained(llama_dir)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    config = minigpt4_config(blip2_parts_config(blip2, blip2_config), llama_dir, tok.convert_tokens_to_ids(IMAGE_TOKEN))
    with torch.device("meta"):
        expected = {k: v.shape for k, v in MiniGPT4ForConditionalGeneration(config).state_dict().items()}
    if config.text_config.tie_word_embeddings:
        expected.pop("language_model.lm_head.weight", None)

    os.makedirs(output_dir, exist_ok=True)
    shards = list(renamed_shards(blip2, llama_dir, minigpt4_file, vit))
    owner = {key: i for i, (_, state) in enumerate(shards) for key in state}  # the last source of a key wins
    weight_map, dropped, n = {}, [], len(shards)
    for i, (file, state) in enumerate(shards):
        kept = {}
        for key, value in state.items():
            if key not in expected:
                dropped.append(key)
            elif owner[key] == i:
                if tuple(value.shape) != tuple(expected[key]):
                    raise MixtuneError(f"{file}: '{key}' has shape {tuple(value.shape)}, the config gives "
                                       f"{tuple(expected[key])}")
                kept[key] = value.contiguous()
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(kept, os.path.join(output_dir, name), metadata={"format": "pt"})
        weight_map.update({key: name for key in kept})
    missing = sorted(set(expected) - set(weight_map))
    if missing:
        raise MixtuneError(f"the pieces lack {len(missing)} weights MiniGPT-4 needs, e.g. {missing[:3]}")
    with open(os.path.join(output_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=1)

    config.save_pretrained(output_dir)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(output_dir)
    image_size = config.vision_config.image_size
    MiniGPT4Processor(blip2_image_processor(image_size), tok, num_query_tokens=config.num_query_tokens,
                      chat_template=CHAT_TEMPLATE).save_pretrained(output_dir)
    return {"output_dir": output_dir, "weights": len(weight_map), "dropped": len(dropped),
            "dropped_examples": sorted(dropped)[:5], "image_token_index": config.image_token_index}
