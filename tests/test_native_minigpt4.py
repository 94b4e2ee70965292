"""MiniGPT-4's native port against PaddleMIX's own implementation (tests/golden/minigpt4, made by
make_golden_paddlemix.py with PaddlePaddle 3.3.1 CPU + PaddleNLP 2.8.1 + PaddleMIX's paddlemix/models/minigpt4):
the same weights, stored under the key names mixtune reads (BLIP-2's `vision_model` / `qformer` / `query_tokens`,
`language_projection`, transformers' Llama under `language_model`), give the same logits (fp32, 1e-4) and loss,
and a change to one layer breaks the match. Also: the processor writes PaddleMIX's [first, image, second] ids,
and `mixtune convert --from minigpt4` builds a loadable folder from the released pieces."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from goldens import decode_weights, write_checkpoint

import mixtune.native.minigpt4  # noqa: F401  (registers model_type "minigpt4" with transformers)

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "minigpt4")


def golden():
    return np.load(os.path.join(GOLDEN, "golden.npz"))


def golden_state() -> dict[str, torch.Tensor]:
    return decode_weights(golden())


def golden_checkpoint(folder) -> str:
    return write_checkpoint(golden_state(), GOLDEN, folder)


def inputs(model):
    """PaddleMIX's [first ids, image, second ids, reply ids] as one row: the image as num_query_tokens image ids."""
    data = golden()
    n = model.config.num_query_tokens
    parts = [data["first_input_ids"], np.full((1, n), model.config.image_token_index), data["second_input_ids"],
             data["reply_ids"]]
    ids = torch.from_numpy(np.concatenate(parts, axis=1).astype(np.int64))
    pixels = torch.from_numpy(data["pixels_q"].astype(np.float32) * data["pixels_scale"])
    return ids, pixels


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForImageTextToText

    path = golden_checkpoint(tmp_path_factory.mktemp("minigpt4_golden"))
    loaded, info = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return loaded.eval()


def test_every_key_is_loaded(model):
    assert set(golden_state()) == set(model.state_dict())
    for key, value in golden_state().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_logits_and_loss_match_paddlemix(model):
    ids, pixels = inputs(model)
    expected = torch.from_numpy(golden()["logits"])
    reply = torch.from_numpy(golden()["reply_ids"].astype(np.int64))
    labels = torch.full_like(ids, -100)
    labels[:, -reply.shape[1]:] = reply
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, labels=labels)
    assert out.logits.shape == expected.shape == (1, ids.shape[1], model.config.text_config.vocab_size)
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-4)
    # PaddleMIX's loss, under PaddleNLP 2.8.1, is its Llama criterion over *unshifted* labels: the logits at a
    # reply token's own position against that token (PaddleNLP's LlamaForCausalLM does not shift; PaddleMIX
    # concatenates the labels aligned with the inputs). Reproduced here from mixtune's logits:
    reply_logits = out.logits[0, -reply.shape[1]:]
    unshifted = torch.nn.functional.cross_entropy(reply_logits, reply[0])
    assert abs(unshifted.item() - float(golden()["loss"])) < 1e-5
    # mixtune trains next-token prediction, as Vision-CAIR's MiniGPT-4 (transformers' Llama) does: the reply's
    # tokens predicted from the positions before them
    shifted = torch.nn.functional.cross_entropy(out.logits[0, -reply.shape[1] - 1:-1], reply[0])
    assert abs(out.loss.item() - shifted.item()) < 1e-6
    assert abs(out.loss.item() - unshifted.item()) > 1e-2  # the two conventions really differ on this input


@pytest.mark.parametrize("param", ["vision_model.encoder.layers.1.self_attn.qkv.bias", "query_tokens",
                                   "qformer.encoder.layer.0.crossattention.attention.key.weight",
                                   "language_projection.weight", "language_model.model.layers.1.mlp.down_proj.weight"])
def test_changing_one_layer_breaks_the_match(model, param):
    ids, pixels = inputs(model)
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


def test_the_image_lands_on_its_tokens(model):
    """Another image changes the logits from its first query token on, and none before it."""
    ids, pixels = inputs(model)
    start = int((ids[0] == model.config.image_token_index).nonzero()[0])
    with torch.no_grad():
        same = model(input_ids=ids, pixel_values=pixels).logits
        other = model(input_ids=ids, pixel_values=-pixels).logits
    torch.testing.assert_close(other[0, :start], same[0, :start], rtol=0, atol=0)
    assert (other[0, start] - same[0, start]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="8 image tokens in the input, but 2 images"):
        model(input_ids=ids, pixel_values=torch.cat([pixels, pixels]))


def test_processor_writes_paddlemix_first_and_second_ids(tiny_model_dir):
    """PaddleMIX tokenises the prompt before `<ImageHere>` with BOS and the rest without; the processor gives the
    same ids with num_query_tokens image ids between them."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir("minigpt4"))
    tok, n = processor.tokenizer, processor.num_query_tokens
    prompt = "###Human: <Img><ImageHere></Img> What colour is it? ###Assistant:"
    first, second = prompt.split("<ImageHere>")
    out = processor(text=[prompt], images=[Image.new("RGB", (30, 50))], return_offsets_mapping=True)
    expected = ([tok.bos_token_id] + tok(first, add_special_tokens=False)["input_ids"] + [processor.image_token_id] * n
                + tok(second, add_special_tokens=False)["input_ids"])
    assert out["input_ids"][0].tolist() == expected
    assert tuple(out["pixel_values"].shape) == (1, 3, 56, 56)
    image_offsets = out["offset_mapping"][0][len(tok(first, add_special_tokens=False)["input_ids"]) + 1]
    assert prompt[image_offsets[0]:image_offsets[1]] == "<ImageHere>"
    with pytest.raises(ValueError, match="1 <ImageHere> tags but 2 images"):
        processor(text=[prompt], images=[Image.new("RGB", (30, 50))] * 2)


def test_template_writes_vicuna_v0_turns(tiny_model_dir):
    from transformers import AutoProcessor

    from mixtune.data.conversation import Conversation, Turn
    from mixtune.data.templates import to_messages

    processor = AutoProcessor.from_pretrained(tiny_model_dir("minigpt4"))
    conv = Conversation(turns=[Turn("user", "<image>What colour?"), Turn("assistant", "red"),
                               Turn("user", "Shape?"), Turn("assistant", "round")],
                        file="m.json", index=0, images=["a"])
    assert processor.apply_chat_template(to_messages(conv), tokenize=False) == (
        "<s>###Human: <Img><ImageHere></Img> What colour? ###Assistant: red###</s>"
        "Human: Shape? ###Assistant: round###</s>")


def released_pieces(tiny_model_dir, folder):
    """Tiny stand-ins for what MiniGPT-4's users download: a BLIP-2 folder, a Vicuna folder, pretrained_minigpt4.pth
    (its llama_proj, plus one llama_model tensor, which must win over the Vicuna's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mixtune.models.llava import llama_tokenizer
    from mixtune.models.tiny import TEXT_SIZES

    torch.manual_seed(0)
    tok = llama_tokenizer()
    llama = LlamaForCausalLM(LlamaConfig(**{**TEXT_SIZES, "hidden_size": 96}, vocab_size=len(tok),
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False))
    llama.save_pretrained(folder / "vicuna")
    tok.save_pretrained(folder / "vicuna")
    released = {"llama_proj.weight": torch.randn(96, 64), "llama_proj.bias": torch.randn(96),
                "llama_model.model.norm.weight": torch.randn(96)}
    torch.save({"model": released}, folder / "pretrained_minigpt4.pth")
    return tiny_model_dir("blip-2"), str(folder / "vicuna"), str(folder / "pretrained_minigpt4.pth"), released


def test_convert_builds_a_loadable_folder_from_the_released_pieces(tiny_model_dir, tmp_path):
    from PIL import Image
    from safetensors.torch import load_file as load_safetensors

    from mixtune.cli import main
    from mixtune.data.conversation import Conversation, Turn
    from mixtune.data.encode import encode_with_processor, generation_inputs
    from mixtune.data.templates import make_renderer
    from mixtune.models.loading import load_model_and_processor

    blip2, vicuna, pth, released = released_pieces(tiny_model_dir, tmp_path)
    out = tmp_path / "minigpt4"
    assert main(["convert", "--from", "minigpt4", "--blip2", blip2, "--llama", vicuna, "--minigpt4", pth,
                 "--output_dir", str(out)]) == 0
    family, model, processor = load_model_and_processor(str(out))
    assert family.name == "minigpt4" and processor.num_query_tokens == 8
    state = model.state_dict()
    blip2_state = load_safetensors(os.path.join(blip2, "model.safetensors"))
    vicuna_state = load_safetensors(os.path.join(vicuna, "model.safetensors"))
    for key, value in blip2_state.items():
        if key.startswith(("vision_model.", "qformer.", "query_tokens")):
            assert torch.equal(state[key], value), key
    for key, value in vicuna_state.items():
        if key != "model.norm.weight":
            assert torch.equal(state[f"language_model.{key}"], value), key
    assert torch.equal(state["language_model.model.norm.weight"], released["llama_model.model.norm.weight"])
    assert torch.equal(state["language_projection.weight"], released["llama_proj.weight"])
    n_blip2 = sum(k.startswith(("vision_model.", "qformer.", "query_tokens")) for k in blip2_state)
    assert len(state) == n_blip2 + len(vicuna_state) + 2
    # the image token is added past the Vicuna's vocabulary, which keeps its size
    assert model.config.image_token_index == model.config.text_config.vocab_size == len(processor.tokenizer) - 1

    render = make_renderer(processor, None, family.image_placeholder, family.default_chat_template)
    conv = Conversation(turns=[Turn("user", "<image>What colour is it?"), Turn("assistant", "red")],
                        file="mem.json", index=0, images=["mem"])
    red = Image.new("RGB", (80, 60), (200, 20, 20))
    enc = encode_with_processor(conv, [red], processor, render)
    assert int((enc.input_ids == model.config.image_token_index).sum()) == 8
    loss = model(input_ids=enc.input_ids[None], pixel_values=enc.media["pixel_values"], labels=enc.labels[None]).loss
    assert torch.isfinite(loss)
    inputs = generation_inputs(Conversation(turns=conv.turns[:1], file="mem.json", index=0, images=["mem"]), [red],
                               processor, render)
    generated = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3


def test_convert_names_a_checkpoint_without_llama_proj(tiny_model_dir, tmp_path):
    from mixtune.convert.minigpt4 import convert_minigpt4
    from mixtune.errors import MixtuneError

    blip2, vicuna, _, _ = released_pieces(tiny_model_dir, tmp_path)
    torch.save({"model": {"something.else": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(MixtuneError, match=r"other\.pth: no llama_proj\.weight"):
        convert_minigpt4(blip2, vicuna, str(tmp_path / "other.pth"), str(tmp_path / "out"))


def test_minigpt4_recipe_trains_only_the_projection(tiny_model_dir, tmp_path):
    """PaddleMIX ships no MiniGPT-4 config file; its examples/minigpt4/run_train.py defaults are the recipe:
    learning rate 3e-5, weight decay 0.05, CosineDecayWithWarmup (warm-up start 1e-6, floor 1e-5), ViT, Q-Former
    and Llama frozen. In mixtune terms (freeze_vision covers ViT + Q-Former + query tokens), 2 steps change
    exactly the language_projection weights."""
    from transformers import AutoModelForImageTextToText

    from conftest import red_image, write_json
    from mixtune.config import build_config
    from mixtune.train.run import train

    img = red_image(tmp_path / "red.png")
    data = write_json(tmp_path / "train.json", [{"image": img, "conversations": [["<image>Describe it.",
                                                                                   "a red square"]]}] * 6)
    model_dir = tiny_model_dir("minigpt4")
    raw = {"model_name_or_path": model_dir, "dataset": {"train": [{"name": "chatml_dataset", "data_files": data}]},
           "output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 6,
           "learning_rate": 3e-5, "weight_decay": 0.05, "lr_scheduler_name": "CosineDecayWithWarmup",
           "warmup_start_lr": 1e-6, "eta_min": 1e-5, "freeze_vision": True, "freeze_language": True,
           "save_strategy": "no", "disable_tqdm": True, "seed": 42}
    metrics = train(build_config(raw, base_dir=str(tmp_path)))
    assert metrics["train_loss"] > 0
    base = dict(AutoModelForImageTextToText.from_pretrained(model_dir).named_parameters())
    tuned = dict(AutoModelForImageTextToText.from_pretrained(str(tmp_path / "out")).named_parameters())
    moved = sorted(n for n in base if not torch.equal(base[n], tuned[n]))
    assert moved == ["language_projection.bias", "language_projection.weight"]


def lavis_names(blip2_state: dict) -> tuple[dict, dict]:
    """The tiny BLIP-2's tower and Q-Former under LAVIS's names, as Vision-CAIR's MiniGPT-4 downloads them:
    (eva_vit_g.pth without its `visual_encoder.` prefix, blip2_pretrained_flant5xxl.pth), each with the extra
    tensors such files hold and MiniGPT-4 ignores."""
    vit, blip2 = {}, {"query_tokens": blip2_state["query_tokens"]}
    vision = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
              "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
              "embeddings.patch_embedding.bias": "patch_embed.proj.bias"}
    block = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.qkv": "attn.qkv",
             "self_attn.projection": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for key, value in blip2_state.items():
        if key.startswith("vision_model.embeddings."):
            vit[vision[key.removeprefix("vision_model.")]] = value
        elif key.startswith("vision_model.post_layernorm."):
            blip2["ln_vision." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("vision_model.encoder.layers."):
            i, rest = key.removeprefix("vision_model.encoder.layers.").split(".", 1)
            module, param = rest.rsplit(".", 1)
            if rest == "self_attn.qkv.bias":
                q, _, v = value.chunk(3)
                vit[f"blocks.{i}.attn.q_bias"], vit[f"blocks.{i}.attn.v_bias"] = q, v
            else:
                vit[f"blocks.{i}.{block[module]}.{param}"] = value
        elif key.startswith("qformer.layernorm."):
            blip2["Qformer.bert.embeddings.LayerNorm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("qformer.encoder.layer."):
            lavis = key.replace("qformer.", "Qformer.bert.", 1).replace("attention.attention.", "attention.self.")
            blip2[lavis] = value
    width = blip2_state["vision_model.post_layernorm.weight"].shape[0]
    vit["blocks.2.norm1.weight"] = torch.ones(width)  # EVA ViT-g's last block, which MiniGPT-4 leaves out
    blip2["Qformer.bert.encoder.layer.0.intermediate.dense.weight"] = torch.ones(3)  # the text branch
    blip2["Qformer.cls.predictions.bias"] = torch.ones(3)
    blip2["t5_proj.weight"] = torch.ones(3)
    return vit, blip2


def test_convert_reads_lavis_checkpoints_as_transformers_blip2(tiny_model_dir, tmp_path):
    """LAVIS's eva_vit_g.pth + blip2_pretrained_flant5xxl.pth give the same folder as transformers' BLIP-2 folder,
    except EVA's missing k bias, which is zero (transformers' BLIP-2 stores one qkv bias)."""
    from safetensors.torch import load_file as load_safetensors

    from mixtune.convert.minigpt4 import convert_minigpt4

    blip2, vicuna, pth, _ = released_pieces(tiny_model_dir, tmp_path)
    hf_state = load_safetensors(os.path.join(blip2, "model.safetensors"))
    vit, lavis = lavis_names(hf_state)
    torch.save(vit, tmp_path / "eva_vit_g.pth")
    torch.save({"model": lavis}, tmp_path / "blip2_pretrained.pth")
    report = convert_minigpt4(str(tmp_path / "blip2_pretrained.pth"), vicuna, pth, str(tmp_path / "lavis"),
                              vit=str(tmp_path / "eva_vit_g.pth"), blip2_config=blip2)
    assert report["dropped"] == 1  # the ViT's extra block; the text branch and T5 parts are never read
    convert_minigpt4(blip2, vicuna, pth, str(tmp_path / "hf"))
    from_lavis = load_safetensors_folder(tmp_path / "lavis")
    from_hf = load_safetensors_folder(tmp_path / "hf")
    assert set(from_lavis) == set(from_hf)
    for key, value in from_hf.items():
        if key.endswith("self_attn.qkv.bias"):
            q, _, v = value.chunk(3)
            value = torch.cat([q, torch.zeros_like(q), v])
        assert torch.equal(from_lavis[key], value), key


def load_safetensors_folder(folder) -> dict:
    from safetensors.torch import load_file as load_safetensors

    state = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            state.update(load_safetensors(os.path.join(folder, name)))
    return state


def test_generation_with_cache_equals_recomputing(model):
    """Greedy decoding with the KV cache (image vectors inserted once, at the prompt) gives the tokens that
    recomputing the whole sequence at every step (the image inserted each time) gives."""
    ids, pixels = inputs(model)
    prompt = ids[:, :-6]
    kwargs = dict(pixel_values=pixels, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kwargs)
        recomputed = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (1, prompt.shape[1] + 6)
    assert torch.equal(cached, recomputed)
