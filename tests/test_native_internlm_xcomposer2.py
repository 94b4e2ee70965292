"""InternLM-XComposer2's native port against PaddleMIX's own implementation (tests/golden/internlm_xcomposer2, made by
make_golden_paddlemix.py with PaddlePaddle 3.3.1 CPU + PaddleNLP 2.8.1 + PaddleMIX's models/internlm_xcomposer2):
the same weights, stored under the published key names, give the same logits (fp32, 1e-4) and loss, and a change to
one weight (a Partial LoRA one included) breaks the match. Also: the Partial LoRA layer touches image positions
only and composes with peft's LoRA, the processor's `<ImageHere>` expansion, a published folder loading without
remote code, and saving in the published layout."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from goldens import decode_weights, write_checkpoint

import mixtune.native.internlm_xcomposer2  # noqa: F401  (registers model_type "internlmxcomposer2")
from mixtune.native.internlm_xcomposer2.plora import PLoRALinear

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "internlm_xcomposer2")


def golden():
    return np.load(os.path.join(GOLDEN, "golden.npz"))


def golden_checkpoint(folder) -> str:
    """A checkpoint folder holding the fixture's weights by their published key names (config.json + safetensors)."""
    return write_checkpoint(decode_weights(golden()), GOLDEN, folder)


def inputs(placeholder_id: int):
    """The fixture's sample as mixtune's processor writes it: text ids, one placeholder id per image vector, text."""
    data = golden()
    n_image = int(data["im_mask"].sum())
    ids = list(data["before_ids"]) + [placeholder_id] * n_image + list(data["after_ids"])
    pixels = torch.from_numpy(data["pixels_q"].astype(np.float32) * data["pixels_scale"])
    return (torch.tensor([ids], dtype=torch.long), pixels, torch.from_numpy(data["labels"].astype(np.int64)))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = golden_checkpoint(tmp_path_factory.mktemp("xcomposer2_golden"))
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # no trust_remote_code


def test_every_published_key_is_loaded(model):
    keys = {n[2:] for n in golden().files if n.startswith("w:")}
    assert keys == set(model.state_dict())
    assert sum(".Plora_A." in k for k in keys) == sum(".Plora_B." in k for k in keys) == 2 * 5  # 2 layers x 5


def test_image_positions_are_paddlemix_im_mask(model):
    ids, _, _ = inputs(model.config.image_placeholder_id)
    expected = torch.from_numpy(golden()["im_mask"])
    assert torch.equal(ids == model.config.image_placeholder_id, expected)


def test_logits_and_loss_match_paddlemix(model):
    ids, pixels, labels = inputs(model.config.image_placeholder_id)
    expected = torch.from_numpy(golden()["logits"])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, labels=labels)
    assert out.logits.shape == expected.shape == (1, 278, 128)
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-4)
    # The same per-token losses, normalised differently: mixtune (transformers) averages over the labelled
    # tokens; PaddleMIX's loss (paddle's CrossEntropyLoss "mean" under PaddlePaddle 3.3.1) divides the sum by
    # every position, -100 ones included.
    shifted = labels[:, 1:]
    labelled, positions = int((shifted != -100).sum()), shifted.numel()
    assert labelled == 6 and positions == 277
    assert abs(out.loss.item() * labelled / positions - float(golden()["loss"])) < 1e-5
    assert out.loss.item() > 1.0  # a real mean over 6 tokens, not the diluted one


@pytest.mark.parametrize("param", ["model.layers.1.attention.wqkv.Plora_B.weight",
                                   "model.layers.0.feed_forward.w2.Plora_A.weight",
                                   "model.layers.1.feed_forward.w3.weight",
                                   "vit.vision_tower.vision_model.encoder.layers.1.mlp.fc2.weight",
                                   "vision_proj.2.weight"])
def test_changing_one_weight_breaks_the_match(model, param):
    ids, pixels, _ = inputs(model.config.image_placeholder_id)
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


def test_partial_lora_never_touches_text_only_input(model):
    """With no image in the input, every Plora weight can change and the logits do not."""
    ids = torch.from_numpy(golden()["after_ids"].astype(np.int64))[None]
    plora = [p for n, p in model.named_parameters() if ".Plora_" in n]
    saved = [p.detach().clone() for p in plora]
    try:
        with torch.no_grad():
            before = model(input_ids=ids).logits
            for p in plora:
                p.add_(torch.randn_like(p))
            after = model(input_ids=ids).logits
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    finally:
        with torch.no_grad():
            for p, s in zip(plora, saved):
                p.copy_(s)


def plora_layer(seed=0) -> PLoRALinear:
    torch.manual_seed(seed)
    layer = PLoRALinear(8, 6, bias=True, lora_r=4, lora_alpha=8)
    with torch.no_grad():
        layer.Plora_B.weight.normal_()
    return layer.eval()


def test_plora_applies_at_image_positions_only():
    layer = plora_layer()
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 0, 1]], dtype=torch.bool)
    plain = torch.nn.functional.linear(x, layer.weight, layer.bias)
    delta = layer.Plora_B(layer.Plora_A(x)) * (8 / 4)
    out = layer(x, mask)
    torch.testing.assert_close(out[~mask], plain[~mask], rtol=0, atol=0)
    torch.testing.assert_close(out[mask], (plain + delta)[mask])
    torch.testing.assert_close(layer(x), plain, rtol=0, atol=0)  # no mask: a plain linear
    with pytest.raises(ValueError, match="im_mask has shape"):
        layer(x, mask[:, :4])


def test_peft_lora_wraps_plora_and_both_apply():
    from peft import LoraConfig, get_peft_model

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wqkv = plora_layer()

        def forward(self, x, im_mask):
            return self.wqkv(x, im_mask)

    block = Block()
    x = torch.randn(1, 5, 8)
    mask = torch.tensor([[0, 1, 1, 0, 0]], dtype=torch.bool)
    expected_base = block(x, mask)
    lora = get_peft_model(block, LoraConfig(target_modules=["wqkv"], r=2, lora_alpha=4, init_lora_weights=False))
    wrapped = lora.base_model.model.wqkv
    assert isinstance(wrapped.base_layer, PLoRALinear)
    adapter = wrapped.lora_B["default"](wrapped.lora_A["default"](x)) * wrapped.scaling["default"]
    with torch.no_grad():
        torch.testing.assert_close(lora(x, mask), expected_base + adapter)
    # the Partial LoRA's own weights are the pretrained model's: peft freezes them with the rest
    assert not wrapped.base_layer.Plora_A.weight.requires_grad and wrapped.lora_A["default"].weight.requires_grad


def test_processor_expands_each_image_mark(tiny_model_dir):
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir("internlm_xcomposer2"))
    text = "<ImageHere>Compare with <ImageHere> please"
    out = processor(text=[text], images=[Image.new("RGB", (30, 50)), Image.new("RGB", (56, 56))],
                    return_offsets_mapping=True)
    ids = out["input_ids"][0].tolist()
    placeholder = processor.tokenizer.image_placeholder_id
    n = processor.image_seq_length
    assert ids[0] == processor.tokenizer.bos_token_id and ids[1:1 + n] == [placeholder] * n
    assert ids.count(placeholder) == 2 * n
    second = [i for i, t in enumerate(ids) if t == placeholder][n:]
    assert {tuple(out["offset_mapping"][0, i].tolist()) for i in second} == {(24, 35)}
    assert tuple(out["pixel_values"].shape) == (2, 3, 56, 56)
    with pytest.raises(ValueError, match="2 <ImageHere> marks but 1 images"):
        processor(text=[text], images=[Image.new("RGB", (30, 50))])


def published_layout(tiny: str, folder) -> str:
    """The tiny checkpoint laid out as internlm-xcomposer2-7b is published: config with auto_map to remote code that
    is not there, weights, tokenizer.model and a tokenizer_config.json naming InternLMXComposer2Tokenizer; no
    processor files, no tokenizer.json, no chat template."""
    import shutil

    for name in ("model.safetensors", "tokenizer.model", "generation_config.json"):
        shutil.copy(os.path.join(tiny, name), folder / name)
    with open(os.path.join(tiny, "config.json")) as f:
        config = json.load(f)
    config["auto_map"] = {"AutoConfig": "configuration_internlm_xcomposer2.InternLMXcomposer2Config",
                          "AutoModel": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM",
                          "AutoModelForCausalLM": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLMXComposer2Tokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "</s>", "unk_token": "<unk>",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm_xcomposer2.InternLMXComposer2Tokenizer", None]}}))
    return str(folder)


def test_published_folder_loads_without_remote_code(tiny_model_dir, tmp_path):
    from PIL import Image

    from mixtune.data.conversation import Conversation, Turn
    from mixtune.data.encode import encode_with_processor
    from mixtune.data.templates import make_renderer
    from mixtune.models.loading import load_model_and_processor

    tiny = tiny_model_dir("internlm_xcomposer2")
    family, model, processor = load_model_and_processor(published_layout(tiny, tmp_path))
    _, reference, tiny_processor = load_model_and_processor(tiny)
    assert family.name == "internlm_xcomposer2"
    assert processor.image_seq_length == tiny_processor.image_seq_length == 16
    render = make_renderer(processor, None, family.image_placeholder, family.default_chat_template)
    conv = Conversation(turns=[Turn("user", "<image>What colour is it?"), Turn("assistant", "red")],
                        file="mem.json", index=0, images=["mem"])
    image = Image.new("RGB", (90, 60), (200, 20, 20))
    enc = encode_with_processor(conv, [image], processor, render)
    same = encode_with_processor(conv, [image], tiny_processor, make_renderer(tiny_processor, None,
                                                                              family.image_placeholder))
    assert torch.equal(enc.input_ids, same.input_ids) and torch.equal(enc.labels, same.labels)
    with torch.no_grad():
        batch = dict(input_ids=enc.input_ids[None], pixel_values=enc.media["pixel_values"])
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=0, atol=0)


def test_saved_checkpoint_keeps_the_published_key_names(model, tmp_path):
    from safetensors import safe_open

    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert saved == {n[2:] for n in golden().files if n.startswith("w:")}
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "internlmxcomposer2"


def test_cached_generation_equals_full_recomputation(tiny_model_dir):
    """Greedy generation with the cache (the image spliced in at the prompt only, later steps text) picks the
    same tokens as recomputing the whole sequence, image included, at every step."""
    from PIL import Image

    from mixtune.models.loading import load_model_and_processor

    _, model, processor = load_model_and_processor(tiny_model_dir("internlm_xcomposer2"))
    model.eval()
    batch = processor(text=["[UNUSED_TOKEN_146]user\n<ImageHere>What colour?[UNUSED_TOKEN_145]\n"
                            "[UNUSED_TOKEN_146]assistant\n"], images=[Image.new("RGB", (64, 48), (200, 30, 30))])
    with torch.no_grad():
        generated = model.generate(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                                   max_new_tokens=4, do_sample=False)
        ids = batch["input_ids"]
        assert generated.shape[1] > ids.shape[1]
        for _ in range(generated.shape[1] - ids.shape[1]):
            logits = model(input_ids=ids, pixel_values=batch["pixel_values"], use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, ids)


def test_a_4khd_folder_is_refused_in_one_line(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from mixtune.errors import MixtuneError

    folder = golden_checkpoint(tmp_path)
    weights = load_file(os.path.join(folder, "model.safetensors"))
    weights["plora_glb_GN"] = torch.zeros(1, 1, 8)  # the 4KHD variant's tile separators
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MixtuneError, match="4KHD") as caught:
        AutoModelForCausalLM.from_pretrained(folder)
    assert "\n" not in str(caught.value)
