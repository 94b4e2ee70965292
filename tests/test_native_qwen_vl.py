"""Qwen-VL's native port against PaddleMIX's own implementation (tests/golden/qwen_vl, made by
make_golden_paddlemix.py with PaddlePaddle 3.3.1 CPU + PaddleNLP 2.8.1 + PaddleMIX's paddlemix/models/qwen_vl):
the same weights, stored under the published Qwen-VL key names, give the same logits (fp32, 1e-4) and loss, and a
change to one layer breaks the match. Also: the tokenizer encodes as tiktoken does with the same ranks, the
processor's image spans, and PaddleMIX's freeze glob / LoRA regexes select the original modules."""

from __future__ import annotations

import json
import os
import re
from fnmatch import fnmatch

import numpy as np
import pytest
import torch

from goldens import decode_weights, write_checkpoint

import mixtune.native.qwen_vl  # noqa: F401  (registers model_type "qwen" with transformers)

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "qwen_vl")


def golden():
    return np.load(os.path.join(GOLDEN, "golden.npz"))


def golden_checkpoint(folder) -> str:
    """A checkpoint folder holding the fixture's weights by their published key names (config.json + safetensors)."""
    return write_checkpoint(decode_weights(golden()), GOLDEN, folder)


def inputs():
    data = golden()
    pixels = torch.from_numpy(data["pixels_q"].astype(np.float32) * data["pixels_scale"])
    return (torch.from_numpy(data["input_ids"].astype(np.int64)), pixels,
            torch.from_numpy(data["labels"].astype(np.int64)))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = golden_checkpoint(tmp_path_factory.mktemp("qwen_vl_golden"))
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # no trust_remote_code
    return loaded.eval()


def test_every_published_key_is_loaded(model):
    keys = {n[2:] for n in golden().files if n.startswith("w:")}
    assert keys == set(model.state_dict())


def test_logits_and_loss_match_paddlemix(model):
    ids, pixels, labels = inputs()
    expected = torch.from_numpy(golden()["logits"])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, labels=labels)
    assert out.logits.shape == expected.shape
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-4)
    # The same per-token losses, normalised differently: mixtune (transformers) averages over the labelled
    # tokens; PaddleMIX's loss, under PaddlePaddle 3.3.1, is paddle's CrossEntropyLoss "mean", which divides the
    # sum by every position, -100 ones included (checked there on a 4-row example: 0.0635 vs 0.1269).
    shifted = labels[:, 1:]
    labelled, positions = int((shifted != -100).sum()), shifted.numel()
    assert labelled == 12 and positions == 556
    assert abs(out.loss.item() * labelled / positions - float(golden()["loss"])) < 1e-5
    assert out.loss.item() > 1.0  # a real mean over 12 tokens, not the diluted one


@pytest.mark.parametrize("param", ["transformer.h.1.mlp.w2.weight", "transformer.visual.attn_pool.query",
                                   "transformer.visual.transformer.resblocks.0.attn.in_proj.bias"])
def test_changing_one_layer_breaks_the_match(model, param):
    ids, pixels, _ = inputs()
    expected = torch.from_numpy(golden()["logits"])
    weight = dict(model.named_parameters())[param]
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.add_(torch.randn_like(weight) * 0.01)
            changed = model(input_ids=ids, pixel_values=pixels).logits
        assert (changed - expected).abs().max() > 1e-3
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_images_land_on_their_own_spans(model):
    """Swapping the two samples' images changes both samples' logits after their image, not before it."""
    ids, pixels, _ = inputs()
    with torch.no_grad():
        same = model(input_ids=ids, pixel_values=pixels).logits
        swapped = model(input_ids=ids, pixel_values=pixels.flip(0)).logits
    start = int((ids[0] == model.config.image_start_id).nonzero()[0])
    torch.testing.assert_close(swapped[0, :start + 1], same[0, :start + 1])
    assert (swapped[0, -1] - same[0, -1]).abs().max() > 1e-3


def test_paddlemix_globs_and_regexes_select_the_original_modules(model):
    names = [n for n, _ in model.named_parameters()]
    frozen = [n for n in names if fnmatch(n, "*visual*") and not fnmatch(n, "*visual.attn_pool*")]
    assert "transformer.visual.conv1.weight" in frozen and not any("attn_pool" in n for n in frozen)
    assert any(n.startswith("transformer.visual.attn_pool.") for n in names)
    modules = [n for n, _ in model.named_modules()]
    lora = [n for n in modules if any(re.fullmatch(r, n) for r in
                                      (".*attn.c_attn.*", ".*attn.c_proj.*", ".*mlp.w1.*", ".*mlp.w2.*"))]
    assert sorted(lora) == sorted(f"transformer.h.{i}.{m}" for i in range(2)
                                  for m in ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2"))


def test_tokenizer_encodes_as_tiktoken(tiny_model_dir):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from transformers import AutoTokenizer

    from mixtune.native.qwen_vl.tokenization_qwen import PAT_STR, SPECIAL_TOKENS

    path = tiny_model_dir("qwen_vl")
    ranks = load_tiktoken_bpe(os.path.join(path, "qwen.tiktoken"))
    reference = tiktoken.Encoding("qwen", pat_str=PAT_STR, mergeable_ranks=ranks,
                                  special_tokens={t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)})
    tok = AutoTokenizer.from_pretrained(path)
    for text in ["What colour is the shape?  Answer: red!\n\n 12345 ünïcode 你好 ",
                 "<|im_start|>user\nPicture 1: <img>a.jpg</img>\n<ref>cat</ref><box>(1,2),(30,40)</box><|im_end|>"]:
        assert tok(text, add_special_tokens=False)["input_ids"] == reference.encode(text, allowed_special="all")
    assert tok.convert_tokens_to_ids("<img>") == len(ranks) + SPECIAL_TOKENS.index("<img>")


def test_processor_expands_each_image_span(tiny_model_dir):
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir("qwen_vl"))
    text = "Picture 1: <img>x.png</img>\nand Picture 2: <img></img>\nsame?"
    out = processor(text=[text], images=[Image.new("RGB", (30, 50)), Image.new("RGB", (112, 112))])
    ids = out["input_ids"][0].tolist()
    tok = processor.tokenizer
    start, pad, end = (tok.convert_tokens_to_ids(t) for t in ("<img>", "<imgpad>", "</img>"))
    assert ids.count(start) == ids.count(end) == 2 and ids.count(pad) == 2 * processor.n_queries
    assert tuple(out["pixel_values"].shape) == (2, 3, 112, 112)
    with pytest.raises(ValueError, match="2 <img>...</img> spans but 1 images"):
        processor(text=[text], images=[Image.new("RGB", (30, 50))])


def published_layout(tiny: str, folder) -> str:
    """The tiny checkpoint laid out as Qwen-VL is published: config with auto_map to remote code that is not there,
    weights, qwen.tiktoken and a tokenizer_config.json naming QWenTokenizer; no processor files, no tokenizer.json,
    no chat template."""
    import shutil

    for name in ("model.safetensors", "qwen.tiktoken", "generation_config.json"):
        shutil.copy(os.path.join(tiny, name), folder / name)
    with open(os.path.join(tiny, "config.json")) as f:
        config = json.load(f)
    config["auto_map"] = {"AutoConfig": "configuration_qwen.QWenConfig",
                          "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}))
    return str(folder)


def test_published_folder_loads_without_remote_code(tiny_model_dir, tmp_path):
    from PIL import Image

    from mixtune.data.conversation import Conversation, Turn
    from mixtune.data.encode import encode_with_processor
    from mixtune.data.templates import make_renderer
    from mixtune.models.loading import load_model_and_processor

    tiny = tiny_model_dir("qwen_vl")
    family, model, processor = load_model_and_processor(published_layout(tiny, tmp_path))
    _, reference, tiny_processor = load_model_and_processor(tiny)
    assert family.name == "qwen_vl" and processor.n_queries == tiny_processor.n_queries
    render = make_renderer(processor, None, family.image_placeholder, family.default_chat_template)
    conv = Conversation(turns=[Turn("user", "<image>What colour is it?"), Turn("assistant", "red")],
                        file="mem.json", index=0, images=["mem"])
    enc = encode_with_processor(conv, [Image.new("RGB", (90, 60), (200, 20, 20))], processor, render)
    tiny_render = make_renderer(tiny_processor, None, family.image_placeholder)
    same = encode_with_processor(conv, [Image.new("RGB", (90, 60), (200, 20, 20))], tiny_processor, tiny_render)
    assert torch.equal(enc.input_ids, same.input_ids) and torch.equal(enc.labels, same.labels)
    torch.testing.assert_close(enc.media["pixel_values"], same.media["pixel_values"])
    with torch.no_grad():
        batch = dict(input_ids=enc.input_ids[None], pixel_values=enc.media["pixel_values"])
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=0, atol=0)


def test_saved_checkpoint_keeps_the_published_key_names(model, tmp_path):
    from safetensors import safe_open

    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert saved == {n[2:] for n in golden().files if n.startswith("w:")}


@pytest.mark.parametrize("text", ["<image>What colour?", "Picture 1: <image>\nWhat colour?"])
def test_template_writes_pictures_as_qwen_vl_chat_does(tiny_model_dir, text):
    """mixtune's `<image>` and Qwen-VL's own "Picture 1: <img>a.jpg</img>\\n" data render alike, once."""
    from transformers import AutoProcessor

    from mixtune.data.conversation import Conversation, Turn
    from mixtune.data.templates import to_messages

    processor = AutoProcessor.from_pretrained(tiny_model_dir("qwen_vl"))
    conv = Conversation(turns=[Turn("user", text + " Picture 2: <image>\nAnd?"), Turn("assistant", "red")],
                        file="m.json", index=0, images=["a", "b"])
    assert processor.apply_chat_template(to_messages(conv), tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Picture 1: <img></img>\nWhat colour? Picture 2: <img></img>\nAnd?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n")
