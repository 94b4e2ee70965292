"""`mixtune export`: for every family in the zoo, the exported folder holds the tiny checkpoint's exact key
set and shapes (hub names, none of transformers 5's in-memory renames), and plain transformers reloads it
with equal logits; a LoRA adapter is merged in and the export answers as the adapter model does."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from PIL import Image

from mixtune.cli import main
from mixtune.data.conversation import Conversation, Turn
from mixtune.export import safetensors_layout
from mixtune.infer.engine import Engine, batch_inputs
from mixtune.models.loading import model_class_of
from mixtune.models.registry import families, get_family

FAMILIES = [f.name for f in families()]


def logits(model_dir: str, inputs: dict) -> torch.Tensor:
    auto = model_class_of(get_family_of(model_dir))
    model = auto.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**inputs).logits


def get_family_of(model_dir):
    from mixtune.models.registry import family_for_checkpoint

    return family_for_checkpoint(model_dir)


def question_inputs(model_dir: str) -> dict:
    engine = Engine.load(model_dir)
    conv = Conversation(turns=[Turn("user", "<image>What colour is it?")], images=["m"])
    row = engine.inputs(conv, [Image.new("RGB", (64, 48), (200, 30, 30))])
    return batch_inputs([row], engine.pad_token_id, engine.family.collate_media)


@pytest.mark.parametrize("name", FAMILIES)
def test_export_keeps_hub_keys_and_logits(tiny_model_dir, tmp_path, name):
    get_family(name).check_requires()
    tiny = tiny_model_dir(name)
    out = tmp_path / "export"
    assert main(["export", "--model", tiny, "--to", str(out)]) == 0
    exported, original = safetensors_layout(str(out)), safetensors_layout(tiny)
    assert {k: v[0] for k, v in exported.items()} == {k: v[0] for k, v in original.items()}
    assert json.load(open(out / "mixtune_export.json"))["matches_base_checkpoint"] is True
    inputs = question_inputs(tiny)
    torch.testing.assert_close(logits(str(out), inputs), logits(tiny, inputs), rtol=0, atol=0)
    # the chat template travels with it; BLIP-2 style checkpoints get the prompt format mixtune trained with
    fam = get_family(name)
    own = chat_template(transformers.AutoProcessor.from_pretrained(tiny))
    expected = own or (fam.default_chat_template if fam.uses_chat_template else None)
    assert chat_template(transformers.AutoProcessor.from_pretrained(out)) == expected


def chat_template(processor):
    """The processor's template, or (BLIP-2: the processor reloads it onto its tokenizer) the tokenizer's."""
    return getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)

def test_export_merges_lora_in_bfloat16(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from mixtune.models.loading import load_model_and_processor

    base = tiny_model_dir("qwen2_vl")
    _, model, processor = load_model_and_processor(base)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                                                  init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    processor.save_pretrained(adapter)
    out32, out16 = tmp_path / "e32", tmp_path / "e16"
    assert main(["export", "--model", base, "--lora_path", str(adapter), "--to", str(out32)]) == 0
    assert main(["export", "--lora_path", str(adapter), "--to", str(out16), "--dtype", "bfloat16"]) == 0
    layout32, layout16, original = (safetensors_layout(str(p)) for p in (out32, out16, base))
    assert {k: v[0] for k, v in layout32.items()} == {k: v[0] for k, v in original.items()}
    assert not any("lora" in k for k in layout32)
    assert {v[1] for v in layout16.values()} == {"BF16"}
    inputs = question_inputs(base)
    adapted = Engine.load(base, str(adapter)).model  # the adapter merged in memory
    with torch.no_grad():
        expected = adapted(**inputs).logits
    torch.testing.assert_close(logits(str(out32), inputs), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(logits(base, inputs), expected, atol=1e-3)  # the adapter changed the model


def test_export_refuses_a_non_empty_folder(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "x.txt").write_text("keep me")
    assert main(["export", "--model", tiny_model_dir("qwen2_vl"), "--to", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
