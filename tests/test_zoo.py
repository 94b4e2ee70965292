"""The model zoo: every registered family, on its tiny checkpoint, does what `mixtune list-models` claims.

Parametrised over the registry itself, so a family cannot be listed without being tested: labels are
exactly the assistant tokens, 3 SFT steps lower the loss on a repeated batch, 3 LoRA steps on the
family's default targets lower it too, the saved folder reloads with plain transformers to identical
logits, `generate` runs, and the freeze parts split the parameters as documented.
"""

from __future__ import annotations

from fnmatch import fnmatch

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from mixtune.data.collate import PadCollator
from mixtune.data.conversation import Conversation, Turn
from mixtune.data.encode import IGNORE_INDEX, encode_with_processor, generation_inputs
from mixtune.data.templates import make_renderer
from mixtune.errors import MixtuneError
from mixtune.media.audio import Audio
from mixtune.models.registry import families, get_family
from mixtune.train.freeze import PARTS, apply_freeze, part_of
from mixtune.models.loading import load_model_and_processor

FAMILIES = [f.name for f in families()]

# What ends an assistant turn in each family's chat template (labelled after each reply).
END_OF_TURN = {"llava": "</s>", "llava_next": "</s>", "llava_next_video": "</s>", "gemma3": "<end_of_turn>",
               "mllama": "<|eot_id|>",
               "idefics3": "<end_of_utterance>", "smolvlm": "<end_of_utterance>", "paligemma": "<eos>",
               "glm4v": "<|endoftext|>", "blip-2": "</s>", "instructblip": "</s>", "visualglm": "<eop>",
               "cogvlm": "</s>", "cogagent": "</s>"}
# Attention projections LoRA must wrap by default, where a family's names are not q_proj / v_proj.
LORA_KINDS = {"qwen_vl": {"c_attn", "w1"}, "visualglm": {"query_key_value", "dense_h_to_4h"},
              **{name: {"language_expert_query_key_value", "vision_expert_query_key_value", "gate_proj"}
                 for name in ("cogvlm", "cogagent")}}
# Families that train one reply per sample (PaliGemma's prefix/suffix; VisualGLM's GLM prompt, which is attended
# both ways, so earlier replies are prompt: tests/test_native_visualglm.py checks that)
ONE_REPLY = ("paligemma", "visualglm")


def conversation(reply="red", second=("And the shape?", "a round circle"), kind="image"):
    turns = [Turn("user", f"<{kind}>What colour is it?"), Turn("assistant", reply)]
    if second:
        turns += [Turn("user", second[0]), Turn("assistant", second[1])]
    return Conversation(turns=turns, file="mem.json", index=0, **{f"{kind}s": ["mem"]})


def media_for(fam):
    """The family's first media kind and three different inputs of it (the third for the "another input
    changes the logits" check): images, or tones for audio-only models."""
    if fam.reads_images:
        return "image", (Image.new("RGB", (112, 112), (220, 30, 30)), Image.new("RGB", (160, 96), (30, 30, 220)),
                         Image.new("RGB", (112, 112), (30, 30, 220)))
    t = np.arange(16000) / 16000
    tones = [Audio(np.sin(2 * np.pi * hz * t).astype(np.float32) * 0.5, 16000) for hz in (440, 880, 1320)]
    return "audio", (tones[0], tones[1], tones[2])


def encoder(fam, processor):
    render = (make_renderer(processor, None, fam.image_placeholder, fam.default_chat_template)
              if fam.uses_chat_template else None)
    encode = fam.encode or encode_with_processor
    make_inputs = fam.generation_inputs or generation_inputs
    return (lambda conv, images: encode(conv, images, processor, render),
            lambda conv, images: make_inputs(conv, images, processor, render))


def labelled_pieces(enc, tokenizer) -> list[str]:
    pieces, current = [], []
    for token, label in zip(enc.input_ids.tolist(), enc.labels.tolist()):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            pieces.append(tokenizer.decode(current))
            current = []
    if current:
        pieces.append(tokenizer.decode(current))
    return [p.strip() for p in pieces]


def steps(model, batch, n=3, lr=1e-3) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(n):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", FAMILIES)
def test_family(tiny_model_dir, tmp_path, name):
    fam = get_family(name)
    for module in fam.requires:
        pytest.importorskip(module, reason=f"{name} needs {module}")
    path = tiny_model_dir(name)
    torch.manual_seed(0)
    loaded_fam, model, processor = load_model_and_processor(path)  # found by the checkpoint's model_type
    assert loaded_fam is fam
    tok = processor.tokenizer
    encode, make_inputs = encoder(fam, processor)
    kind, (red, blue, third) = media_for(fam)

    # labels: exactly each reply plus the end-of-turn marker
    multi_turn = fam.name not in ONE_REPLY
    enc = encode(conversation(second=("And the shape?", "a round circle") if multi_turn else None, kind=kind), [red])
    eot = END_OF_TURN.get(fam.name, "<|im_end|>")
    expected = [f"red{eot}", f"a round circle{eot}"] if multi_turn else [f"red{eot}"]
    assert labelled_pieces(enc, tok) == expected

    # SFT: 3 steps on a repeated batch of two different samples (different image sizes where supported)
    other = encode(conversation("blue", second=None, kind=kind), [blue])
    collate = PadCollator(tok.pad_token_id if tok.pad_token_id is not None else 0, fam.collate_media)
    batch = collate([enc, other])
    losses = steps(model, batch)
    assert losses[-1] < losses[0], losses

    # save, reload with plain transformers, same logits; generate runs
    out = tmp_path / "sft"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    model.eval()
    reloaded = getattr(transformers, fam.auto_class).from_pretrained(out).eval()
    reprocessor = transformers.AutoProcessor.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-5)
    inputs = make_inputs(conversation(second=None, kind=kind), [red])
    assert set(inputs) <= set(batch), set(inputs) - set(batch)  # training feeds every input the model gets
    _, regen = encoder(fam, reprocessor)
    assert set(regen(conversation(second=None, kind=kind), [red])) == set(inputs)
    with torch.no_grad():  # the image reaches the language model: another image changes the next-token logits
        other_image = make_inputs(conversation(second=None, kind=kind), [third])
        change = (reloaded(**inputs).logits[0, -1] - reloaded(**other_image).logits[0, -1]).abs().max()
    assert change > 1e-4, change
    generated = reloaded.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                  pad_token_id=tok.pad_token_id)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3

    # LoRA on the family's default targets: only language-model modules, and it learns
    from peft import LoraConfig, get_peft_model

    base = getattr(transformers, fam.auto_class).from_pretrained(path)
    lora = get_peft_model(base, LoraConfig(target_modules=fam.lora_targets, r=4, lora_alpha=8))
    wrapped = [n.removeprefix("base_model.model.") for n, m in lora.named_modules() if hasattr(m, "lora_A")]
    kinds = {n.rsplit(".", 1)[-1] for n in wrapped}
    assert LORA_KINDS.get(name, {"q_proj", "v_proj"}) <= kinds, kinds
    assert all(part_of(f"{n}.weight", fam) == "language" for n in wrapped), wrapped
    lora_losses = steps(lora, batch, lr=1e-2)
    assert lora_losses[-1] < lora_losses[0], lora_losses


@pytest.mark.parametrize("name", FAMILIES)
def test_freeze_parts_split_parameters(tiny_model_dir, name):
    fam = get_family(name)
    for module in fam.requires:
        pytest.importorskip(module, reason=f"{name} needs {module}")
    _, model, _ = load_model_and_processor(tiny_model_dir(name))
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    parts = {n: part_of(n, fam) for n in sizes}
    assert [n for n, part in parts.items() if part is None] == []  # the three parts cover every parameter
    counts = {part: sum(s for n, s in sizes.items() if parts[n] == part) for part in PARTS}
    assert all(counts[part] > 0 for part in PARTS), counts
    assert sum(counts.values()) == sum(sizes.values())
    # globs overlap only where the projector sits inside the vision tower's module (Qwen-VL's merger)
    for n in sizes:
        hits = [part for part in PARTS if any(fnmatch(n, g) for g in getattr(fam, part))]
        assert hits in (["vision"], ["projector"], ["language"], ["vision", "projector"]), (n, hits)
    apply_freeze(model, None, None, fam, ("vision", "language"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == counts["projector"]


def test_unsupported_checkpoint_lists_families(tmp_path):
    from mixtune.models.registry import family_for_checkpoint

    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(MixtuneError) as e:
        family_for_checkpoint(str(tmp_path))
    message = str(e.value)
    assert "unsupported model family 'bert'" in message
    for name in FAMILIES:
        assert name in message
    assert get_family("blip2") is get_family("blip-2")


def test_list_models_prints_every_family(capsys):
    from mixtune.cli import main

    assert main(["list-models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[1:] if line.strip() and not line.startswith("(")}
    # the chat families (contrastive / classification rows: tests/test_tasks.py)
    rows = {name: row for name, row in rows.items() if row.split()[7] == "chat"}
    assert sorted(rows) == sorted(FAMILIES)
    for name, row in rows.items():
        cells = row.split()
        # what test_family checks for every registered family: SFT, LoRA, generation
        assert cells[2:4] == ["yes", "yes"] and cells[5] == "yes", row
        assert cells[4] == ("yes" if get_family(name).pack_positions else "no"), row
        assert cells[6] == ",".join(get_family(name).media_kinds), row


def test_instructblip_qformer_never_sees_the_answer(tiny_model_dir):
    _, _, processor = load_model_and_processor(tiny_model_dir("instructblip"))
    encode, _ = encoder(get_family("instructblip"), processor)
    enc = encode(conversation("zebra", second=None), [Image.new("RGB", (56, 56))])
    qformer_text = processor.qformer_tokenizer.decode(enc.media["qformer_input_ids"][0])
    assert "What colour is it?" in qformer_text and "zebra" not in qformer_text
    assert "zebra" in processor.tokenizer.decode(enc.input_ids)


def test_paligemma_refuses_multi_turn_samples(tiny_model_dir):
    _, _, processor = load_model_and_processor(tiny_model_dir("paligemma"))
    encode, _ = encoder(get_family("paligemma"), processor)
    with pytest.raises(MixtuneError, match="one prefix/suffix pair per sample; this conversation has 2"):
        encode(conversation(), [Image.new("RGB", (56, 56))])


def test_freeze_shortcuts_from_config(tiny_model_dir, tmp_path):
    from conftest import red_image, write_config, write_json
    from mixtune.config import load_config
    from mixtune.train.run import build_trainer

    data = write_json(tmp_path / "train.json", [{"image": red_image(tmp_path / "red.png"),
                                                 "conversations": [["<image>Colour?", "red"]]}])
    cfg = load_config(write_config(tmp_path, tiny_model_dir("qwen2_vl"), data, freeze_vision=True,
                                   freeze_exclude=["model.visual.blocks.0.*"]))
    model = build_trainer(cfg).model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    names = [n for n, _ in model.named_parameters()]
    # the vision tower is frozen except the excluded block; the merger (projector) and language stay trainable
    assert trainable == {n for n in names if not n.startswith("model.visual.")
                         or n.startswith(("model.visual.merger.", "model.visual.blocks.0."))}
    assert any(n.startswith("model.visual.blocks.1.") for n in names)
