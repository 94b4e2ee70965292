"""The minimonkey family among InternVL2 checkpoints (both `model_type` "internvl_chat"): a folder laid out as
MiniMonkey is published (remote-code auto_map into modeling_minimonkey_chat, no processor files) loads as MiniMonkey
with the multi-scale cropping processor and encodes as the tiny checkpoint does; the same folder without the marker
is InternVL2; the processor's layout settings reload."""

from __future__ import annotations

import json
import os
import shutil

import torch
from PIL import Image

from mixtune.data.conversation import Conversation, Turn
from mixtune.data.encode import encode_with_processor
from mixtune.data.templates import make_renderer
from mixtune.models.loading import load_model_and_processor


def published_layout(tiny: str, folder, auto_map: dict) -> str:
    """The tiny MiniMonkey as published: config.json with an auto_map to remote code that is not there (and no
    architectures entry of ours), weights, tokenizer.model and tokenizer_config.json; no processor files."""
    from transformers import AutoTokenizer

    folder.mkdir(exist_ok=True)
    for name in ("model.safetensors", "tokenizer.model", "generation_config.json"):
        shutil.copy(os.path.join(tiny, name), folder / name)
    config = json.loads(open(os.path.join(tiny, "config.json")).read())
    config.pop("img_context_token_id")
    config["architectures"] = ["InternVLChatModel"] if "internvl" in str(auto_map) else ["MiniMonkeyChatModel"]
    config["auto_map"] = auto_map
    (folder / "config.json").write_text(json.dumps(config))
    tok = AutoTokenizer.from_pretrained(tiny)
    added = {str(i): {"content": t.content, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False} for i, t in tok.added_tokens_decoder.items()
             if t.content not in ("<unk>", "<s>", "</s>")}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLM2Tokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
        "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>", "added_tokens_decoder": added,
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}}))
    return str(folder)


MINIMONKEY_MAP = {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                  "AutoModel": "modeling_minimonkey_chat.MiniMonkeyChatModel"}
INTERNVL_MAP = {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                "AutoModel": "modeling_internvl_chat.InternVLChatModel"}


def encode(family, processor, image):
    render = make_renderer(processor, None, family.image_placeholder, family.default_chat_template)
    conv = Conversation(turns=[Turn("user", "<image>What colour is it?"), Turn("assistant", "red")],
                        file="mem.json", index=0, images=["mem"])
    return encode_with_processor(conv, [image], processor, render)


def test_published_folder_loads_as_minimonkey(tiny_model_dir, tmp_path):
    tiny = tiny_model_dir("minimonkey")
    family, model, processor = load_model_and_processor(published_layout(tiny, tmp_path / "mm", MINIMONKEY_MAP))
    assert family.name == "minimonkey" and type(model).__name__ == "MiniMonkeyChatModel"
    assert type(processor.image_processor).__name__ == "MiniMonkeyImageProcessor"
    _, reference, tiny_processor = load_model_and_processor(tiny)
    tiny_processor.chat_template = None  # both render with InternVL2's prompt format (the published one has no other)
    image = Image.new("RGB", (300, 100), (200, 20, 20))  # a 3x1 detail grid and a 2x2 adaptive one: 8 tiles
    enc, same = encode(family, processor, image), encode(family, tiny_processor, image)
    assert enc.media["pixel_values"].shape[0] == 8
    # the published folder's own tiling bounds (config.json: 1..4 tiles here) with PaddleMIX's adaptive layer
    assert torch.equal(enc.input_ids, same.input_ids) and torch.equal(enc.labels, same.labels)
    torch.testing.assert_close(enc.media["pixel_values"], same.media["pixel_values"])
    with torch.no_grad():
        batch = dict(input_ids=enc.input_ids[None], pixel_values=enc.media["pixel_values"])
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=0, atol=0)


def test_internvl2_folder_stays_internvl2(tiny_model_dir, tmp_path):
    tiny = tiny_model_dir("minimonkey")
    family, model, processor = load_model_and_processor(published_layout(tiny, tmp_path / "iv", INTERNVL_MAP))
    assert family.name == "internvl_chat" and type(model).__name__ == "InternVLChatModel"
    assert type(processor.image_processor).__name__ == "InternVLChatImageProcessor"


def test_layout_settings_reload(tmp_path):
    from transformers import AutoProcessor

    from mixtune.models.internvl_chat import tiny_tokenizer
    from mixtune.native.minimonkey import MiniMonkeyImageProcessor, MiniMonkeyProcessor
    from mixtune.native.minimonkey.msac import CHAT_LAYOUT

    images = MiniMonkeyImageProcessor(112, True, True, 4, 12, 3, 7, adaptive_first=True, prior_rule="paddlemix")
    MiniMonkeyProcessor(images, tiny_tokenizer(), num_image_token=16).save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == "MiniMonkeyProcessor" and reloaded.image_processor.layout() == CHAT_LAYOUT
