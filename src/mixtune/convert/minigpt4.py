"""`mixtune convert --from minigpt4`: one MiniGPT-4 folder from the released pieces, as PaddleMIX's
examples/minigpt4/merge_weight.py merges them:

- a BLIP-2 folder in transformers' layout (e.g. Salesforce/blip2-flan-t5-xxl): its `vision_model.*` (EVA ViT-g),
  `qformer.*` and `query_tokens` are kept, its language model is not;
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


def minigpt4_config(blip2_dir: str, llama_dir: str, image_token_index: int):
    from mixtune.native.minigpt4 import MiniGPT4Config

    blip2, text = read_config(blip2_dir, "blip2"), read_config(llama_dir, "llama")
    for key in ("vision_config", "qformer_config"):
        if key not in blip2:
            raise MixtuneError(f"{blip2_dir}/config.json: no '{key}' (not a BLIP-2 checkpoint)")
    if text.get("model_type") != "llama":
        raise MixtuneError(f"{llama_dir}/config.json: model_type '{text.get('model_type')}', MiniGPT-4 takes a "
                           "Llama / Vicuna ('llama')")
    return MiniGPT4Config(vision_config=blip2["vision_config"], qformer_config=blip2["qformer_config"],
                          text_config=text, num_query_tokens=blip2.get("num_query_tokens", 32),
                          image_token_index=image_token_index, architectures=["MiniGPT4ForConditionalGeneration"])


def renamed_shards(blip2_dir: str, llama_dir: str, minigpt4_file: str) -> Iterator[tuple[str, dict]]:
    """(source file, {mixtune key: tensor}) per source shard; the MiniGPT-4 checkpoint last, so its tensors win."""
    for file in weight_files(blip2_dir):
        yield file, {k: v for k, v in read_weights(file).items() if k.startswith(BLIP2_PREFIXES)}
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


def convert_minigpt4(blip2_dir: str, llama_dir: str, minigpt4_file: str, output_dir: str) -> dict:
    from transformers import AutoTokenizer, GenerationConfig

    from mixtune.models.minigpt4 import CHAT_TEMPLATE
    from mixtune.native.minigpt4 import IMAGE_TOKEN, MiniGPT4ForConditionalGeneration, MiniGPT4Processor
    from mixtune.native.minigpt4.processing_minigpt4 import blip2_image_processor

    tok = AutoTokenizer.from_pretrained(llama_dir)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    config = minigpt4_config(blip2_dir, llama_dir, tok.convert_tokens_to_ids(IMAGE_TOKEN))
    with torch.device("meta"):
        expected = {k: v.shape for k, v in MiniGPT4ForConditionalGeneration(config).state_dict().items()}
    if config.text_config.tie_word_embeddings:
        expected.pop("language_model.lm_head.weight", None)

    os.makedirs(output_dir, exist_ok=True)
    shards = list(renamed_shards(blip2_dir, llama_dir, minigpt4_file))
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
