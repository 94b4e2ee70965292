"""InternVL2's native port against PaddleMIX's own implementation (tests/golden/internvl_chat, made by
make_golden_paddlemix.py with PaddlePaddle 3.3.1 CPU + PaddleNLP 2.8.1 + PaddleMIX's paddlemix/models/internvl2):
the same weights, stored under the published InternVL2 key names, give the same logits (fp32, 1e-4) and loss (an
InternLM2 LM with grouped-query attention and dynamic NTK rope, a 3-tile image, a text-only sample whose padding
tile is flagged 0), InternViT-6B's qk-norm variant gives the same features, PaddleMIX's dynamic tiling gives the
same pixels, and a change to one layer breaks the match. Also: a published folder (no processor files, remote-code
auto_map) loads without remote code, and saves keep the published names."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from goldens import decode_weights, write_checkpoint

import mixtune.native.internvl_chat  # noqa: F401  (registers model_type "internvl_chat" with transformers)

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "internvl_chat")


def golden():
    return np.load(os.path.join(GOLDEN, "golden.npz"))


def golden_weights(prefix: str = "") -> dict[str, torch.Tensor]:
    return decode_weights(golden(), prefix, skip=None if prefix else "qk:")


def golden_checkpoint(folder) -> str:
    """A folder as published: config.json (no img_context_token_id) + safetensors by the published key names."""
    return write_checkpoint(golden_weights(), GOLDEN, folder)


def inputs():
    data = golden()
    pixels = torch.from_numpy(data["pixels_q"].astype(np.float32) * data["pixels_scale"])
    return (torch.from_numpy(data["input_ids"].astype(np.int64)), pixels,
            torch.from_numpy(data["labels"].astype(np.int64)), torch.from_numpy(data["image_flags"].astype(np.int64)))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = golden_checkpoint(tmp_path_factory.mktemp("internvl_golden"))
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # no trust_remote_code
    loaded.config.img_context_token_id = 127  # the fixture's <IMG_CONTEXT> (a published folder's tokenizer says)
    return loaded.eval()


def test_every_published_key_is_loaded(model):
    assert set(golden_weights()) == set(model.state_dict())
    assert type(model.language_model).__name__ == "InternLM2ForCausalLM"


def test_logits_and_loss_match_paddlemix(model):
    ids, pixels, labels, flags = inputs()
    expected = torch.from_numpy(golden()["logits"])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, image_flags=flags, labels=labels,
                    attention_mask=torch.ones_like(ids))
    assert out.logits.shape == expected.shape
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-4)
    # The same per-token losses; PaddleMIX's loss (paddle's CrossEntropyLoss "mean" under PaddlePaddle 3.3.1)
    # divides their sum by every position, -100 ones included; mixtune (transformers) by the labelled ones.
    shifted = labels[:, 1:]
    labelled, positions = int((shifted != -100).sum()), shifted.numel()
    assert labelled == 12 and positions == 56
    assert abs(out.loss.item() * labelled / positions - float(golden()["loss"])) < 1e-5


def test_dynamic_rope_is_in_play(model):
    """The fixture is longer than its max_position_embeddings (16): without the published dynamic NTK scaling the
    logits differ, so the golden match above covers it."""
    ids, pixels, _, flags = inputs()
    scaling = model.language_model.model.rotary_emb.kind
    try:
        model.language_model.model.rotary_emb.kind = None
        with torch.no_grad():
            plain = model(input_ids=ids, pixel_values=pixels, image_flags=flags).logits
    finally:
        model.language_model.model.rotary_emb.kind = scaling
    assert (plain - torch.from_numpy(golden()["logits"])).abs().max() > 1e-3


@pytest.mark.parametrize("param", ["language_model.model.layers.1.feed_forward.w2.weight", "mlp1.1.weight",
                                   "vision_model.encoder.layers.0.ls1", "vision_model.embeddings.position_embedding",
                                   "language_model.model.layers.0.attention.wqkv.weight"])
def test_changing_one_layer_breaks_the_match(model, param):
    ids, pixels, _, flags = inputs()
    expected = torch.from_numpy(golden()["logits"])
    weight = dict(model.named_parameters())[param]
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.add_(torch.randn_like(weight) * 0.01)
            changed = model(input_ids=ids, pixel_values=pixels, image_flags=flags).logits
        assert (changed - expected).abs().max() > 1e-3
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_image_tokens_take_the_image_and_flags_drop_padding_tiles(model):
    ids, pixels, _, flags = inputs()
    with torch.no_grad():
        same = model(input_ids=ids, pixel_values=pixels, image_flags=flags).logits
        other = model(input_ids=ids, pixel_values=pixels.flip(0), image_flags=flags.flip(0)).logits
    start = int((ids[0] == 125).nonzero()[0])
    torch.testing.assert_close(other[0, :start + 1], same[0, :start + 1])  # before the image: unchanged
    assert (other[0, -1] - same[0, -1]).abs().max() > 1e-3
    torch.testing.assert_close(other[1], same[1])  # the text-only sample never sees a tile
    with pytest.raises(ValueError, match="12 <IMG_CONTEXT> tokens in the input but 4 image tiles"):
        model(input_ids=ids, pixel_values=pixels)  # without the flags, the padding tile would count


def test_qk_norm_vision_variant_matches_paddlemix():
    from mixtune.native.internvl_chat import InternVisionConfig, InternVisionModel

    with open(os.path.join(GOLDEN, "qk_vit_config.json")) as f:
        config = InternVisionConfig(**{k: v for k, v in json.load(f).items() if k != "model_type"})
    vit = InternVisionModel(config).eval()
    state = golden_weights("qk:")
    assert set(state) == set(vit.state_dict())
    vit.load_state_dict(state)
    _, pixels, _, _ = inputs()
    with torch.no_grad():
        hidden = vit(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(hidden, torch.from_numpy(golden()["qk_vit_hidden"]), rtol=0, atol=1e-4)


def test_dynamic_tiling_matches_paddlemix():
    from PIL import Image

    from mixtune.native.internvl_chat import InternVLChatImageProcessor

    processor = InternVLChatImageProcessor(image_size=56, dynamic_image_size=True, use_thumbnail=True,
                                           min_dynamic_patch=1, max_dynamic_patch=6)
    out = processor(Image.fromarray(golden()["image_u8"]))
    assert out["num_patches"] == [3]  # a 2 x 1 grid and the thumbnail
    torch.testing.assert_close(out["pixel_values"], torch.from_numpy(golden()["processed_pixels"]), rtol=0, atol=1e-5)


def test_saved_checkpoint_keeps_the_published_key_names(model, tmp_path):
    from safetensors import safe_open

    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(golden_weights())
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "internvl_chat" and saved["llm_config"]["model_type"] == "internlm2"
    assert saved["llm_config"]["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    assert saved["vision_config"]["model_type"] == "intern_vit_6b"


def published_layout(tiny: str, folder) -> str:
    """The tiny checkpoint laid out as InternVL2 is published: config.json with auto_map to remote code that is not
    there and no img_context_token_id, weights, tokenizer.model and a tokenizer_config.json naming
    InternLM2Tokenizer with the image tokens in added_tokens_decoder; no processor files, no tokenizer.json."""
    import shutil

    from transformers import AutoTokenizer

    for name in ("model.safetensors", "tokenizer.model", "generation_config.json"):
        shutil.copy(os.path.join(tiny, name), folder / name)
    config = json.loads(open(os.path.join(tiny, "config.json")).read())
    config.pop("img_context_token_id")
    config["auto_map"] = {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                          "AutoModel": "modeling_internvl_chat.InternVLChatModel"}
    (folder / "config.json").write_text(json.dumps(config))
    tok = AutoTokenizer.from_pretrained(tiny)
    added = {str(i): {"content": t.content, "special": True, "lstrip": False, "rstrip": False,
                      "normalized": False, "single_word": False} for i, t in tok.added_tokens_decoder.items()
             if t.content not in ("<unk>", "<s>", "</s>")}
    assert {a["content"] for a in added.values()} >= {"<|im_start|>", "<|im_end|>", "<IMG_CONTEXT>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLM2Tokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
        "added_tokens_decoder": added,
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}}))
    return str(folder)


def test_published_folder_loads_without_remote_code(tiny_model_dir, tmp_path):
    from PIL import Image

    from mixtune.models.loading import load_model_and_processor

    tiny = tiny_model_dir("internvl_chat")
    family, model, processor = load_model_and_processor(published_layout(tiny, tmp_path))
    _, reference, tiny_processor = load_model_and_processor(tiny)
    assert family.name == "internvl_chat" and type(processor.tokenizer).__name__ == "InternLM2Tokenizer"
    assert model.config.img_context_token_id == reference.config.img_context_token_id  # read from the tokenizer
    image = Image.new("RGB", (200, 90), (200, 20, 20))
    text = "<|im_start|>user\n<image>\nWhat colour is it?<|im_end|><|im_start|>assistant\n"
    enc, same = processor(text=[text], images=[image]), tiny_processor(text=[text], images=[image])
    assert torch.equal(enc["input_ids"], same["input_ids"])
    torch.testing.assert_close(enc["pixel_values"], same["pixel_values"])
    assert enc["pixel_values"].shape[0] == 3  # a 2 x 1 grid and the thumbnail
    context = int((enc["input_ids"] == model.config.img_context_token_id).sum())
    assert context == 3 * processor.num_image_token
    with torch.no_grad():
        batch = dict(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"])
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=0, atol=0)


def test_processor_expands_each_image_by_its_tiles(tiny_model_dir):
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir("internvl_chat"))
    tok = processor.tokenizer
    text = "<image>\nand <image>\nsame?"
    out = processor(text=[text], images=[Image.new("RGB", (30, 30)), Image.new("RGB", (330, 100))],
                    return_offsets_mapping=True)
    ids = out["input_ids"][0].tolist()
    assert ids[0] == tok.bos_token_id
    start, context, end = (tok.convert_tokens_to_ids(t) for t in ("<img>", "<IMG_CONTEXT>", "</img>"))
    # square image: one tile (no thumbnail for one tile); 330 x 100 with at most 4 tiles: 3 x 1 grid + thumbnail
    assert out["pixel_values"].shape[0] == 1 + 4
    assert ids.count(start) == ids.count(end) == 2 and ids.count(context) == 5 * processor.num_image_token
    first_end = ids.index(end)
    assert ids[ids.index(start) + 1:first_end] == [context] * processor.num_image_token
    spans = out["offset_mapping"][0][ids.index(start)].tolist()
    assert text[spans[0]:spans[1]] == "<image>"
    with pytest.raises(ValueError, match="3 <image> marks but 2 images"):
        processor(text=[text + "<image>"], images=[Image.new("RGB", (30, 50))] * 2)


def test_default_template_writes_prompts_as_paddlemix_does():
    """Published folders ship no image chat template: the family's default renders a conversation exactly as
    PaddleMIX's internlm2-chat conversation template does (conversation.json, from make_golden_paddlemix.py)."""
    from jinja2 import Template

    from mixtune.models.internvl_chat import CHAT_TEMPLATE

    with open(os.path.join(GOLDEN, "conversation.json")) as f:
        conversation = json.load(f)
    messages = []
    for question, answer in conversation["turns"]:
        text = question.removeprefix("<image>\n")
        content = ([{"type": "image"}] if text != question else []) + [{"type": "text", "text": text}]
        messages += [{"role": "user", "content": content},
                     {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    assert Template(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=False) == conversation["prompt"]


@pytest.mark.parametrize("architecture", ["Qwen2ForCausalLM", "LlamaForCausalLM"])
def test_qwen2_and_llama_language_models_keep_their_published_names(architecture, tmp_path):
    """InternVL2-1B / 4B-style folders: `llm_config.architectures` picks transformers' own LM, under
    `language_model` with its published names; images reach it and generation runs from the cache."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from mixtune.native.internvl_chat import InternVLChatConfig, InternVLChatModel

    llm = dict(architectures=[architecture], vocab_size=64, hidden_size=32, intermediate_size=64,
               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, rope_theta=20.0)
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1, image_size=28,
                  patch_size=14, qkv_bias=True, qk_normalization=False, norm_type="layer_norm")
    config = InternVLChatConfig(vision_config=vision, llm_config=llm, img_context_token_id=63, ps_version="v2")
    torch.manual_seed(0)
    model = InternVLChatModel(config).eval()
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"language_model.model.layers.0.self_attn.q_proj.weight", "language_model.lm_head.weight",
            "language_model.model.embed_tokens.weight", "mlp1.1.weight",
            "vision_model.encoder.layers.0.attn.qkv.weight"} <= keys
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[5, 6, 63, 7, 8]])  # one tile of 28 px: 1 token after the 2x2 pixel shuffle
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        logits = again(input_ids=ids, pixel_values=pixels).logits
        torch.testing.assert_close(logits, model(input_ids=ids, pixel_values=pixels).logits, rtol=0, atol=0)
        assert (again(input_ids=ids, pixel_values=-pixels).logits[0, -1] - logits[0, -1]).abs().max() > 1e-4
        gen = again.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, min_new_tokens=3,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
        full = again(input_ids=gen.sequences, pixel_values=pixels).logits
    torch.testing.assert_close(torch.cat(gen.logits), full[0, 4:-1], rtol=0, atol=1e-4)
