"""CogVLM's and CogAgent's native ports against PaddleMIX's own implementation (tests/golden/cogvlm and
tests/golden/cogagent, made by tests/golden/cogvlm/make_golden_paddlemix.py with PaddlePaddle 3.3.1 CPU + PaddleNLP
2.8.1 + PaddleMIX's paddlemix/models/cogvlm): the same weights, stored under the published key names, give the
same logits (fp32, 1e-4) and loss, and a change to one weight (a vision-expert one, a vision-tower one, CogAgent's
cross-attention) breaks the match. Also: CogVLM's position rule, the expert routing, the processor's token types,
and MixToken packing equal to unpacked."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from goldens import decode_weights, write_checkpoint

import mixtune.native.cogvlm  # noqa: F401  (registers model_types "cogvlm" and "cogagent" with transformers)
from mixtune.native.cogvlm.modeling_cogvlm import build_position_ids, expert_mask

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def golden(kind):
    return np.load(os.path.join(GOLDEN, kind, "golden.npz"))


def golden_checkpoint(kind, folder) -> str:
    return write_checkpoint(decode_weights(golden(kind)), os.path.join(GOLDEN, kind), folder)


def inputs(kind):
    data = golden(kind)
    batch = {"input_ids": torch.from_numpy(data["input_ids"].astype(np.int64)),
             "token_type_ids": torch.from_numpy(data["token_type_ids"].astype(np.int64)),
             "pixel_values": torch.from_numpy(data["pixels_q"].astype(np.float32) * data["pixels_scale"])}
    if "cross_pixels_q" in data.files:
        batch["cross_pixel_values"] = torch.from_numpy(data["cross_pixels_q"].astype(np.float32) * data["pixels_scale"])
    return batch, torch.from_numpy(data["labels"].astype(np.int64))


@pytest.fixture(scope="module", params=["cogvlm", "cogagent"])
def golden_model(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = golden_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # no remote code


def test_every_published_key_is_loaded(golden_model):
    kind, model = golden_model
    keys = {n[2:] for n in golden(kind).files if n.startswith("w:")}
    assert keys == set(model.state_dict())
    assert type(model).__name__ == {"cogvlm": "CogVLMForCausalLM", "cogagent": "CogAgentForCausalLM"}[kind]


def test_logits_and_loss_match_paddlemix(golden_model):
    kind, model = golden_model
    batch, labels = inputs(kind)
    expected = torch.from_numpy(golden(kind)["logits"])
    with torch.no_grad():
        out = model(**batch, labels=labels)
    assert out.logits.shape == expected.shape
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-4)
    # The same per-token losses, normalised differently: mixtune (transformers) averages over the labelled tokens;
    # PaddleMIX's loss is paddle's CrossEntropyLoss "mean", which (PaddlePaddle 3.3.1) divides the sum by every
    # position, -100 ones included (as found for Qwen-VL's fixture too)
    shifted = labels[:, 1:]
    labelled, positions = int((shifted != -100).sum()), shifted.numel()
    assert labelled == 5 * len(labels) and positions == 30 * len(labels)
    assert abs(out.loss.item() * labelled / positions - float(golden(kind)["loss"])) < 1e-5
    assert out.loss.item() > 1.0  # a real mean over the reply tokens, not the diluted one


@pytest.mark.parametrize("param", ["model.layers.1.self_attn.vision_expert_query_key_value.weight",
                                   "model.layers.0.mlp.vision_mlp.down_proj.weight",
                                   "model.layers.1.mlp.language_mlp.up_proj.weight",
                                   "model.vision.transformer.layers.0.attention.query_key_value.bias",
                                   "model.vision.eoi",
                                   "model.layers.0.cross_attn.key_value.weight",
                                   "model.cross_vision.vit.model.blocks.1.attn.q_bias"])
def test_changing_one_weight_breaks_the_match(golden_model, param):
    kind, model = golden_model
    weights = dict(model.named_parameters())
    if param not in weights:
        assert kind == "cogvlm" and "cross" in param  # CogVLM has no high-resolution branch
        return
    batch, _ = inputs(kind)
    expected = torch.from_numpy(golden(kind)["logits"])
    weight = weights[param]
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.add_(torch.randn_like(weight) * 0.01)
            changed = model(**batch).logits
        assert (changed - expected).abs().max() > 1e-3
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_cogvlm_position_rule():
    """bos, boi, first patch, eoi advance the position; the other patches share the first patch's."""
    types = torch.tensor([[0, 1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0, 0, 0]])  # 3 patches; 1 patch
    assert build_position_ids(types).tolist() == [[0, 1, 2, 2, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7]]
    padded = build_position_ids(types, torch.tensor([[1] * 8, [1] * 6 + [0, 0]]))
    assert padded[1].tolist() == [0, 1, 2, 3, 4, 5, 5, 5]  # padding does not advance
    # an image's last position (eoi) takes the language expert, as published
    assert expert_mask(types)[0].tolist() == [False, True, True, True, True, False, False, False]


def test_text_tokens_never_read_the_vision_expert(golden_model):
    """A text-only input gives the same logits whatever the vision expert's weights: routing is by token type."""
    kind, model = golden_model
    batch, _ = inputs(kind)
    ids = batch["input_ids"][:, :8]
    experts = [p for n, p in model.named_parameters() if "vision_expert" in n or ".vision_mlp." in n]
    saved = [p.detach().clone() for p in experts]
    try:
        with torch.no_grad():
            before = model(input_ids=ids).logits
            for p in experts:
                p.add_(torch.randn_like(p))
            after = model(input_ids=ids).logits
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    finally:
        with torch.no_grad():
            for p, s in zip(experts, saved):
                p.copy_(s)


def image_conversation(reply="red"):
    from mixtune.data.conversation import Conversation, Turn

    return Conversation(turns=[Turn("user", "<image>What colour is it?"), Turn("assistant", reply)],
                        file="mem.json", index=0, images=["mem"])


def encoded(path):
    from PIL import Image

    from mixtune.data.encode import encode_with_processor, generation_inputs
    from mixtune.data.templates import make_renderer
    from mixtune.models.loading import load_model_and_processor

    family, model, processor = load_model_and_processor(path)
    render = make_renderer(processor, None, family.image_placeholder, family.default_chat_template)
    image = Image.new("RGB", (90, 60), (200, 20, 20))
    return (family, model, processor, encode_with_processor(image_conversation(), [image], processor, render),
            generation_inputs(image_conversation(), [image], processor, render))


@pytest.mark.parametrize("name", ["cogvlm", "cogagent"])
def test_processor_lays_out_a_sample_as_published(tiny_model_dir, name):
    """BOS, the image's positions (token type 1: patches plus boi and eoi), then the prompt text; CogAgent also gets
    the image at its high resolution."""
    family, model, processor, enc, gen = encoded(tiny_model_dir(name))
    types = enc.token_fields["token_type_ids"]
    n = model.config.vision_tokens
    assert enc.input_ids[0] == processor.tokenizer.bos_token_id and types[0] == 0
    assert types[1:1 + n].tolist() == [1] * n and int(types.sum()) == n
    prompt = processor.tokenizer.decode(enc.input_ids[1 + n:])
    assert prompt == {"cogvlm": "Question: What colour is it? Answer: red</s>",
                      "cogagent": "[INST] What colour is it? [/INST] red</s>"}[name]
    size = model.config.vision_config["image_size"]
    assert tuple(enc.media["pixel_values"].shape) == (1, 3, size, size)
    if name == "cogagent":
        cross = model.config.cross_image_size
        assert tuple(enc.media["cross_pixel_values"].shape) == (1, 3, cross, cross) and cross != size
    else:
        assert "cross_pixel_values" not in enc.media
    with pytest.raises(ValueError, match="1 <image> markups but 0 images"):
        processor(text=["<image>hi"], images=[])


@pytest.mark.parametrize("name", ["cogvlm", "cogagent"])
def test_cached_generation_matches_a_full_forward(tiny_model_dir, name):
    """Greedy generation with the cache (positions rebuilt from the token types at each step, CogAgent's
    cross-attention keys and values kept from the prompt) picks the tokens a full forward over the result picks."""
    _, model, _, _, gen = encoded(tiny_model_dir(name))
    model.eval()
    out = model.generate(**gen, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    prompt = gen["input_ids"].shape[1]
    types = torch.cat([gen["token_type_ids"], torch.zeros(1, 4, dtype=torch.long)], dim=1)
    full = {k: v for k, v in gen.items() if k not in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        logits = model(input_ids=out, token_type_ids=types, use_cache=False, **full).logits
    assert logits[0, prompt - 1:-1].argmax(-1).tolist() == out[0, prompt:].tolist()


def test_freezing_the_vision_expert_with_paddlemix_globs(tiny_model_dir):
    """`freeze_include: ["*vision_expert*", "*.vision_mlp.*"]` keeps every layer's visual expert as it was while
    training moves the language expert."""
    from mixtune.train.freeze import apply_freeze

    _, model, _, enc, _ = encoded(tiny_model_dir("cogvlm"))
    apply_freeze(model, ["*vision_expert*", "*.vision_mlp.*"], None)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if "vision_expert" in n or ".vision_mlp." in n}
    assert len(frozen) == 2 * 5  # per layer: the expert's qkv, dense, and its MLP's three projections
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    batch = {"input_ids": enc.input_ids[None], "labels": enc.labels[None],
             "token_type_ids": enc.token_fields["token_type_ids"][None], **enc.media}
    for _ in range(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in frozen)
    assert not torch.equal(after["model.layers.0.mlp.language_mlp.up_proj.weight"],
                           before["model.layers.0.mlp.language_mlp.up_proj.weight"])


def test_cogagent_refuses_mixtoken_and_says_why(tiny_model_dir, tmp_path):
    from conftest import red_image, write_config, write_json
    from mixtune.config import load_config
    from mixtune.errors import ConfigError

    data = write_json(tmp_path / "train.json", [{"image": red_image(tmp_path / "red.png"),
                                                 "conversations": [["<image>Colour?", "red"]]}])
    with pytest.raises(ConfigError, match="one high-resolution image per row"):
        load_config(write_config(tmp_path, tiny_model_dir("cogagent"), data, mixtoken=True))


KEEP = object()


def published_layout(tiny: str, folder, model_type=KEEP,
                     tokenizer_files=("tokenizer.json", "tokenizer_config.json")) -> str:
    """The tiny checkpoint laid out as CogVLM / CogAgent is published: config with auto_map to remote code that is
    not there, weights, and the (Vicuna) tokenizer files the user puts beside them; no processor files, no chat
    template. `model_type` None drops the key from config.json, "" empties it (THUDM's remote-code config class
    declares none)."""
    import shutil

    for name in ("model.safetensors", "generation_config.json") + tuple(tokenizer_files):
        shutil.copy(os.path.join(tiny, name), folder / name)
    with open(os.path.join(tiny, "config.json")) as f:
        config = json.load(f)
    agent = config["model_type"] == "cogagent"
    config_class = "CogAgentConfig" if agent else "CogVLMConfig"
    config["auto_map"] = {"AutoConfig": f"configuration_{config['model_type']}.{config_class}",
                          "AutoModelForCausalLM": f"modeling_{config['model_type']}.{config['architectures'][0]}"}
    if model_type is None:
        del config["model_type"]
    elif model_type is not KEEP:
        config["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("name", ["cogvlm", "cogagent"])
def test_published_folder_loads_without_remote_code(tiny_model_dir, tmp_path, name):
    from PIL import Image

    from mixtune.data.encode import encode_with_processor
    from mixtune.data.templates import make_renderer
    from mixtune.models.loading import load_model_and_processor

    tiny = tiny_model_dir(name)
    family, model, processor = load_model_and_processor(published_layout(tiny, tmp_path))
    _, reference, tiny_processor = load_model_and_processor(tiny)
    assert family.name == name and processor.vision_tokens == tiny_processor.vision_tokens
    assert processor.cross_image_size == tiny_processor.cross_image_size
    image = Image.new("RGB", (90, 60), (200, 20, 20))
    render = make_renderer(processor, None, family.image_placeholder, family.default_chat_template)
    enc = encode_with_processor(image_conversation(), [image], processor, render)
    same = encode_with_processor(image_conversation(), [image], tiny_processor,
                                 make_renderer(tiny_processor, None, family.image_placeholder))
    assert torch.equal(enc.input_ids, same.input_ids) and torch.equal(enc.labels, same.labels)
    batch = {"input_ids": enc.input_ids[None], "token_type_ids": enc.token_fields["token_type_ids"][None], **enc.media}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=0, atol=0)


def test_saved_checkpoint_keeps_the_published_key_names(golden_model, tmp_path):
    from safetensors import safe_open

    kind, model = golden_model
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert saved == {n[2:] for n in golden(kind).files if n.startswith("w:")}


def plain_folder(tmp_path):
    """A folder whose path says nothing of CogVLM: transformers' fallback (matching the folder's name) finds nothing."""
    folder = tmp_path / "published"
    folder.mkdir()
    assert "cog" not in str(folder).lower()
    return folder


def train_one_step(tmp_path, model_dir: str, out: str) -> float:
    from conftest import red_image, write_config, write_json
    from mixtune.config import load_config
    from mixtune.train.run import train

    data = write_json(tmp_path / "train.json", [{"image": red_image(tmp_path / "red.png"),
                                                 "conversations": [["<image>Colour?", "red"]]}] * 2)
    train(load_config(write_config(tmp_path, model_dir, data, output_dir=str(tmp_path / out), max_steps=1)))
    with open(tmp_path / out / "metrics.json") as f:
        return next(h["loss"] for h in json.load(f)["log_history"] if "loss" in h)


@pytest.mark.parametrize("name,model_type", [("cogvlm", None), ("cogvlm", ""), ("cogagent", None),
                                             ("cogagent", "")])
def test_a_config_without_model_type_is_read_by_its_architectures(tiny_model_dir, tmp_path, name, model_type):
    """THUDM's published config.json has no usable model_type (missing, or ""): the folder, named without "cog", loads
    by its `architectures`, gives the logits of the same checkpoint with its model_type, trains a step with the same
    loss, and saves a config.json that names the model_type."""
    from mixtune.models.loading import load_model_and_processor

    tiny = tiny_model_dir(name)
    folder = published_layout(tiny, plain_folder(tmp_path), model_type=model_type)
    family, model, processor = load_model_and_processor(folder)
    _, reference, _ = load_model_and_processor(tiny)
    assert family.name == name and type(model) is type(reference) and model.config.model_type == name
    _, _, _, enc, _ = encoded(tiny)
    batch = {"input_ids": enc.input_ids[None], "token_type_ids": enc.token_fields["token_type_ids"][None], **enc.media}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=0, atol=0)
    if model_type is None:  # training reads the folder through the config and trainer paths too
        assert train_one_step(tmp_path, folder, "out") == train_one_step(tmp_path, tiny, "ref")
        with open(tmp_path / "out" / "config.json") as f:
            assert json.load(f)["model_type"] == name


def test_unknown_architectures_without_model_type_are_refused_in_one_line(tmp_path):
    from mixtune.errors import MixtuneError
    from mixtune.models.loading import load_model_and_processor

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["SomeOtherForCausalLM"]}))
    with pytest.raises(MixtuneError) as err:
        load_model_and_processor(str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "config.json") in message and "SomeOtherForCausalLM" in message
    assert "CogVLMForCausalLM" in message  # what it could read


def vicuna_tokenizer_files(folder) -> str:
    """Vicuna's tokenizer files, as users put them beside CogVLM's published weights: `tokenizer.model` (here a
    SentencePiece BPE trained on mixtune's small corpus, Llama's ids <unk> 0, <s> 1, </s> 2), `tokenizer_config.json`
    and `special_tokens_map.json` as Vicuna publishes them; no tokenizer.json. Returns the model file."""
    import sentencepiece as spm

    from mixtune.models.tokenizer import _CORPUS

    lines = _CORPUS.strip().splitlines() + ["Question: Answer: [INST] [/INST]"]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "tokenizer"), vocab_size=400, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        minloglevel=2, hard_vocab_limit=False)
    os.remove(folder / "tokenizer.vocab")

    def token(text):
        return {"__type": "AddedToken", "content": text, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": token("<s>"), "clean_up_tokenization_spaces": False,
        "eos_token": token("</s>"), "legacy": False, "model_max_length": 4096, "pad_token": None,
        "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
        "unk_token": token("<unk>")}))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": token("<s>"), "eos_token": token("</s>"), "pad_token": "<unk>", "unk_token": token("<unk>")}))
    return str(folder / "tokenizer.model")


@pytest.mark.parametrize("name,model_type", [("cogvlm", None), ("cogagent", KEEP)])
def test_a_published_folder_with_vicuna_tokenizer_files_loads(tiny_model_dir, tmp_path, name, model_type,
                                                              monkeypatch):
    """Weights + Vicuna's sentencepiece tokenizer files (no tokenizer.json): the processor's tokenizer encodes text
    exactly as sentencepiece does, lays out a sample as published (BOS, image positions, prompt, reply, EOS) and the
    model trains on it. Without a model_type, transformers' AutoConfig is never asked (it would match the folder's
    name, or ask whether to run the remote code config.json's auto_map names)."""
    import sentencepiece as spm
    from transformers import AutoConfig

    from mixtune.tools.merge_lora import load_processor

    folder = plain_folder(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=vicuna_tokenizer_files(folder))
    published_layout(tiny_model_dir(name), folder, model_type=model_type, tokenizer_files=())
    asked = []
    if model_type is None:
        monkeypatch.setattr(AutoConfig, "from_pretrained", lambda *a, **k: asked.append(a) or 1 / 0)
    family, model, processor, enc, _ = encoded(str(folder))
    (tmp_path / "adapter").mkdir()  # an adapter saved without processor files: the base folder's processor
    assert type(load_processor(str(tmp_path / "adapter"), str(folder))) is type(processor)
    monkeypatch.undo()
    assert asked == []
    tok = processor.tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)) == (1, 2, 0, sp.get_piece_size())
    text = "Question: What colour is it? Answer: red"
    if name == "cogagent":
        text = "[INST] What colour is it? [/INST] red"
    assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    n = model.config.vision_tokens
    assert enc.input_ids.tolist() == [1] + [0] * n + sp.encode(text) + [2]
    assert enc.token_fields["token_type_ids"].tolist() == [0] + [1] * n + [0] * (len(sp.encode(text)) + 1)
    trained = enc.labels[enc.labels != -100].tolist()
    assert sp.decode(trained[:-1]).strip() == "red" and trained[-1] == 2
    assert not os.path.exists(folder / "tokenizer.json")
    if name == "cogvlm":
        assert np.isfinite(train_one_step(tmp_path, str(folder), "out"))
