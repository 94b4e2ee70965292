"""VisualGLM-6B's native port against PaddleMIX's own implementation (tests/golden/visualglm, made by
make_golden_paddlemix.py with PaddlePaddle 3.3.1 CPU + PaddleNLP 2.8.1's ChatGLM + PaddleMIX's
paddlemix/models/visualglm): the same weights, stored under the published VisualGLM-6B key names, give the same
logits (fp32, 1e-4) and loss, and a change to one layer breaks the match. Also: GLM's 2-D positions and
prefix-bidirectional mask, exact MixToken packing, cached generation, the tokenizer's whitespace pieces, the
processor's image spans, the published folder layout, and PaddleMIX's freeze glob / LoRA regexes selecting the modules
they select in PaddleMIX."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from goldens import decode_weights, write_checkpoint

import mixtune.native.visualglm  # noqa: F401  (registers model_type "chatglm" with transformers)

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "visualglm")


def golden():
    return np.load(os.path.join(GOLDEN, "golden.npz"))


def golden_keys() -> set[str]:
    return {n[2:] for n in golden().files if n.startswith("w:")}


def golden_checkpoint(folder) -> str:
    return write_checkpoint(decode_weights(golden()), GOLDEN, folder)


def inputs():
    data = golden()
    pixels = torch.from_numpy(data["pixels_q"].astype(np.float32) * data["pixels_scale"])
    return (torch.from_numpy(data["input_ids"].astype(np.int64)), pixels,
            torch.from_numpy(data["labels"].astype(np.int64)))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = golden_checkpoint(tmp_path_factory.mktemp("visualglm_golden"))
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # no trust_remote_code


def test_every_published_key_is_loaded(model):
    # PaddleNLP's ChatGLM ties lm_head to the word embeddings, as transformers does here
    assert set(model.state_dict()) == golden_keys() | {"lm_head.weight"}
    assert model.lm_head.weight is model.transformer.word_embeddings.weight


def test_logits_and_loss_match_paddlemix(model):
    ids, pixels, labels = inputs()
    expected = torch.from_numpy(golden()["logits"])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, labels=labels)
    assert out.logits.shape == expected.shape
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-4)
    # The same per-token losses, normalised differently: transformers averages over the labelled tokens; PaddleNLP's
    # ChatGLM loss (unshifted labels: the generator shifted them) under PaddlePaddle 3.3.1 divides by every position
    labelled, positions = int((labels[:, 1:] != -100).sum()), ids.shape[1]
    assert labelled == 7 and positions == 52
    assert abs(out.loss.item() * labelled / positions - float(golden()["loss"])) < 1e-4


@pytest.mark.parametrize("param", ["transformer.layers.1.mlp.dense_4h_to_h.weight",
                                   "image_encoder.vit.transformer.layers.0.attention.query_key_value.bias",
                                   "image_encoder.qformer.transformer.layers.0.cross_attention.key_value.weight",
                                   "image_encoder.glm_proj.weight"])
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


def test_glm_positions_and_prefix_bidirectional_mask(model):
    from mixtune.native.visualglm.modeling_chatglm import glm_positions

    ids, pixels, _ = inputs()
    cfg = model.config
    positions, state = glm_positions(ids, None, cfg)
    context = int((ids[0] == cfg.bos_token_id).nonzero()[0])
    gmask = int((ids[0] == cfg.gmask_token_id).nonzero()[0])
    assert state == [(0, context, gmask)]
    length = ids.shape[1]
    assert positions[0, 0].tolist() == list(range(context)) + [gmask] * (length - context)
    assert positions[1, 0].tolist() == [0] * context + list(range(1, length - context + 1))
    with torch.no_grad():
        base = model(input_ids=ids, pixel_values=pixels).logits
        late_prompt = ids.clone()
        late_prompt[0, gmask - 1] = (late_prompt[0, gmask - 1] + 1 - 5) % 100 + 5
        reply = ids.clone()
        reply[0, context + 2] = (reply[0, context + 2] + 1 - 5) % 100 + 5
        changed_prompt = model(input_ids=late_prompt, pixel_values=pixels).logits
        changed_reply = model(input_ids=reply, pixel_values=pixels).logits
    # the prompt is attended both ways: its last text token changes the logits at the image's first position
    assert (changed_prompt[0, 1] - base[0, 1]).abs().max() > 1e-3
    # the reply is causal: a reply token changes nothing before it
    torch.testing.assert_close(changed_reply[0, :context + 2], base[0, :context + 2], rtol=0, atol=0)
    assert (changed_reply[0, context + 2] - base[0, context + 2]).abs().max() > 1e-3


def test_packed_row_gives_each_sample_its_own_logits(model):
    from mixtune.data.encode import Encoded
    from mixtune.models.visualglm import pack_positions

    ids, pixels, _ = inputs()
    short = torch.cat([ids[0, :40], torch.tensor([121, 124, 9, 10, 125])])  # same prompt cut, own reply
    samples = [Encoded(input_ids=ids[0], labels=ids[0]), Encoded(input_ids=short, labels=short)]
    row = torch.cat([s.input_ids for s in samples])[None]
    positions = torch.cat([pack_positions(model, s) for s in samples], dim=-1)[:, None]  # (2, 1, L)
    both = torch.cat([pixels, pixels.flip(-1)])
    with torch.no_grad():
        packed = model(input_ids=row, pixel_values=both, position_ids=positions).logits[0]
        first = model(input_ids=ids, pixel_values=pixels).logits[0]
        second = model(input_ids=short[None], pixel_values=pixels.flip(-1)).logits[0]
    # logits here are ~40 in size: 1e-4 is float32 rounding of a differently batched SDPA
    torch.testing.assert_close(packed[: len(ids[0])], first, rtol=0, atol=1e-4)
    torch.testing.assert_close(packed[len(ids[0]):], second, rtol=0, atol=1e-4)


def test_cached_generation_matches_full_forwards_and_left_padding(model):
    ids, pixels, _ = inputs()
    context = int((ids[0] == model.config.bos_token_id).nonzero()[0])
    prompt = ids[:, : context + 1]
    out = model.generate(input_ids=prompt, pixel_values=pixels, attention_mask=torch.ones_like(prompt),
                         max_new_tokens=4, min_new_tokens=4, do_sample=False)
    seq = prompt
    for _ in range(4):  # no cache: the whole sequence each step
        with torch.no_grad():
            logits = model(input_ids=seq, pixel_values=pixels, use_cache=False).logits
        seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)
    assert out.tolist() == seq.tolist()
    padded = torch.cat([torch.full((1, 3), model.config.pad_token_id), prompt], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(prompt)], dim=1)
    with torch.no_grad():
        left = model(input_ids=padded, attention_mask=mask, pixel_values=pixels, use_cache=False).logits
        plain = model(input_ids=prompt, pixel_values=pixels, use_cache=False).logits
    torch.testing.assert_close(left[:, 3:], plain, rtol=0, atol=1e-4)


def test_tokenizer_whitespace_pieces_and_special_tokens(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir("visualglm"))
    text = "What colour\tis it?\n\n答：a   red  circle"
    pieces = tok.tokenize(text)
    assert "<|tab|>" in pieces and pieces.count("<n>") == 2 and "<|blank_3|>" in pieces and "<|blank_2|>" in pieces
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text.replace("：", ":")  # NFKC, as published
    ids = tok.encode("hi")
    assert ids[-2:] == [tok.convert_tokens_to_ids("[gMASK]"), tok.convert_tokens_to_ids("<sop>")]
    assert tok.bos_token == "<sop>" and tok.eos_token == "<eop>" and tok.padding_side == "left"


def test_processor_expands_each_image_span(tiny_model_dir):
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir("visualglm"))
    tok = processor.tokenizer
    text = "<img>cat.jpg</img>问：What colour?\n答："
    out = processor(text=[text], images=[Image.new("RGB", (30, 50))])
    ids = out["input_ids"][0].tolist()
    expected = (tok.encode("<img>", add_special_tokens=False) + [tok.unk_token_id] * 32 +
                tok.encode("</img>问：What colour?\n答：", add_special_tokens=False) +
                [tok.convert_tokens_to_ids("[gMASK]"), tok.bos_token_id])
    assert ids == expected
    assert tuple(out["pixel_values"].shape) == (1, 3, 56, 56)
    with pytest.raises(ValueError, match="1 <img>...</img> spans but 2 images"):
        processor(text=[text], images=[Image.new("RGB", (30, 50))] * 2)


def test_only_the_last_reply_is_trained(tiny_model_dir):
    from PIL import Image

    from mixtune.data.conversation import Conversation, Turn
    from mixtune.data.templates import make_renderer
    from mixtune.models.loading import load_model_and_processor

    family, _, processor = load_model_and_processor(tiny_model_dir("visualglm"))
    render = make_renderer(processor, None, family.image_placeholder, family.default_chat_template)
    conv = Conversation(turns=[Turn("user", "<image>What colour?"), Turn("assistant", "red"),
                               Turn("user", "And the shape?"), Turn("assistant", "circle")],
                        file="m.json", index=0, images=["a"])
    enc = family.encode(conv, [Image.new("RGB", (56, 56))], processor, render)
    tok = processor.tokenizer
    labelled = enc.input_ids[enc.labels != -100]
    assert tok.decode(labelled) == "circle<eop>"
    prompt = tok.decode(enc.input_ids[enc.labels == -100])
    assert prompt.startswith("<img>") and "问:What colour?\n答:red\n问:And the shape?\n答:[gMASK]<sop>" in prompt


def test_paddlemix_patterns_select_what_they_select_in_paddlemix(tiny_model_dir):
    from types import SimpleNamespace

    from mixtune.models.loading import load_model_and_processor
    from mixtune.paddle_compat import read_as_paddlemix

    family, model, _ = load_model_and_processor(tiny_model_dir("visualglm"))
    # as shipped in paddlemix/config/visualglm/{sft,lora_sft}_argument.json
    mix = SimpleNamespace(freeze_include=["*vision_model*"], freeze_exclude=None,
                          lora_target_modules=[".*query_key_value.*", ".*dense.*", ".*dense_h_to_4h",
                                               ".*dense_4h_to_h"])
    notes = read_as_paddlemix(model, family, mix)
    assert len(notes) == 5
    # PaddleMIX's vision_model is the whole EVA ViT, ln_vision included; nothing else
    assert set(mix.freeze_include) == {n for n, _ in model.named_parameters() if n.startswith("image_encoder.vit.")}
    modules = [n for n, _ in model.named_modules()]
    wrapped = {n for n in modules if any(re.fullmatch(r, n) for r in mix.lora_target_modules)}
    lm = {f"transformer.layers.{i}.{m}" for i in range(2) for m in
          ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")}
    # PaddleMIX's `.*dense.*` also names the Q-Former's output / intermediate dense layers (not its query / key /
    # value, nor anything of the ViT, whose layers PaddleMIX calls qkv / projection / fc1 / fc2)
    qformer = {f"image_encoder.qformer.transformer.layers.{i}.{m}" for i in range(2) for m in
               ("attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")} | \
        {"image_encoder.qformer.transformer.layers.0.cross_attention.dense"}
    assert wrapped == lm | qformer


def published_layout(tiny: str, folder) -> str:
    """The tiny checkpoint laid out as VisualGLM-6B is published: config with auto_map to remote code that is not
    there, weights, ice_text.model and a tokenizer_config.json naming ChatGLMTokenizer; no processor files, no chat
    template."""
    for name in ("model.safetensors", "ice_text.model"):
        shutil.copy(os.path.join(tiny, name), folder / name)
    with open(os.path.join(tiny, "config.json")) as f:
        config = json.load(f)
    config["auto_map"] = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                          "AutoModel": "modeling_chatglm.ChatGLMForConditionalGenerationWithImage",
                          "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGenerationWithImage"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>", "gmask_token": "[gMASK]",
        "mask_token": "[MASK]", "pad_token": "<pad>", "unk_token": "<unk>", "remove_space": False,
        "do_lower_case": False, "num_image_tokens": 0, "tokenizer_class": "ChatGLMTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}))
    return str(folder)


def test_published_folder_loads_without_remote_code(tiny_model_dir, tmp_path):
    from PIL import Image

    from mixtune.data.conversation import Conversation, Turn
    from mixtune.data.templates import make_renderer
    from mixtune.models.loading import load_model_and_processor

    tiny = tiny_model_dir("visualglm")
    family, model, processor = load_model_and_processor(published_layout(tiny, tmp_path))
    _, reference, tiny_processor = load_model_and_processor(tiny)
    assert family.name == "visualglm" and processor.image_length == 32
    conv = Conversation(turns=[Turn("user", "<image>What colour is it?"), Turn("assistant", "red")],
                        file="mem.json", index=0, images=["mem"])
    image = Image.new("RGB", (90, 60), (200, 20, 20))
    encs = [family.encode(conv, [image], p, make_renderer(p, None, family.image_placeholder,
                                                          family.default_chat_template))
            for p in (processor, tiny_processor)]
    assert torch.equal(encs[0].input_ids, encs[1].input_ids) and torch.equal(encs[0].labels, encs[1].labels)
    torch.testing.assert_close(encs[0].media["pixel_values"], encs[1].media["pixel_values"])
    with torch.no_grad():
        batch = dict(input_ids=encs[0].input_ids[None], pixel_values=encs[0].media["pixel_values"])
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=0, atol=0)


def test_saved_checkpoint_keeps_the_published_key_names(model, tmp_path):
    from safetensors import safe_open

    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert saved == golden_keys()  # lm_head is tied to the word embeddings: saved once, under the embeddings' name


def test_later_chatglm_folders_are_refused_clearly(tmp_path):
    """ChatGLM2 / ChatGLM3 / GLM-4 folders also say model_type "chatglm": one clear error, not a half-loaded model."""
    from mixtune.errors import MixtuneError
    from mixtune.models.loading import load_model_and_processor

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm", "num_layers": 28,
                                                      "padded_vocab_size": 65024, "multi_query_attention": True}))
    with pytest.raises(MixtuneError, match="is ChatGLM2 / ChatGLM3 / GLM-4, which mixtune does not support"):
        load_model_and_processor(str(tmp_path))


def test_a_text_only_chatglm_folder_is_refused_clearly(tiny_model_dir, tmp_path):
    """ChatGLM-6B's own folder (model_type "chatglm", no `eva_config`: here the tiny checkpoint without its image
    configs and image encoder weights) would otherwise load with a randomly initialised full-size image encoder (it does
    without the check): one clear error instead, before any weights are read."""
    from mixtune.errors import MixtuneError
    from mixtune.models.loading import load_model_and_processor

    folder = shutil.copytree(tiny_model_dir("visualglm"), tmp_path / "chatglm")
    config = json.loads((folder / "config.json").read_text())
    for key in ("eva_config", "qformer_config", "image_length"):
        config.pop(key, None)
    (folder / "config.json").write_text(json.dumps(config))
    weights = load_file(str(folder / "model.safetensors"))
    text_only = {k: v for k, v in weights.items() if not k.startswith("image_encoder.")}
    save_file(text_only, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MixtuneError) as err:
        load_model_and_processor(str(folder))
    assert "\n" not in str(err.value) and "is a text-only ChatGLM-6B" in str(err.value)
    assert "'eva_config'" in str(err.value)
