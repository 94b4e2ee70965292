"""LoRA end to end on tiny checkpoints: targets, counts, peft-format checkpoints, resume, merge round trip."""

import json
import logging
import os
import re

import pytest
import torch
from PIL import Image

from conftest import red_image, write_config, write_json
from mixtune.cli import main
from mixtune.config import load_config
from mixtune.train.lora import compact_names, exact_regex
from mixtune.train.run import build_trainer, train


def repeated_data(tmp_path, n=8):
    img = red_image(tmp_path / "red.png")
    records = [{"image": img, "conversations": [["<image>What colour is the shape?", "red"]]}] * n
    return write_json(tmp_path / "train.json", records)


def lora_config(tmp_path, model_dir, **overrides):
    return load_config(write_config(tmp_path, model_dir, repeated_data(tmp_path), lora=True, **overrides))


def sample_inputs(processor, image_path):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[Image.open(image_path)], return_tensors="pt")


def adapter_names(trainer):
    from mixtune.train.lora import adapter_modules

    return adapter_modules(trainer.model)


@pytest.mark.parametrize("family,extra", [
    ("qwen2_vl", {}),
    ("llava", {}),
    ("qwen2_vl", {"use_dora": True, "use_rslora": True}),
])
def test_merged_model_equals_adapter_model_and_loads_with_plain_transformers(tiny_model_dir, tmp_path, family,
                                                                             extra):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    base_dir = tiny_model_dir(family)
    # the projector trains fully beside the adapters, so the merge must carry it too
    cfg = lora_config(tmp_path, base_dir, max_steps=4, learning_rate=1e-2, lora_modules_to_save=["projector"],
                      **extra)
    train(cfg)
    out = cfg.training.output_dir
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
    assert not any(f.startswith("model") and f.endswith(".safetensors") for f in os.listdir(out))

    inputs = sample_inputs(AutoProcessor.from_pretrained(base_dir), tmp_path / "red.png")
    base = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(**inputs).logits
        adapter = PeftModel.from_pretrained(base, out).eval()  # peft's own loader reads our checkpoint
        adapter_logits = adapter(**inputs).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-3  # training changed the model: the test can fail

    merged_dir = str(tmp_path / "merged")
    assert main(["merge-lora", "--model_name_or_path", base_dir, "--lora_path", out,
                 "--merge_model_path", merged_dir, "--dtype", "float32"]) == 0
    assert not os.path.exists(os.path.join(merged_dir, "adapter_config.json"))
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
    assert not any("lora" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    processor = AutoProcessor.from_pretrained(merged_dir)
    assert processor.chat_template and AutoTokenizer.from_pretrained(merged_dir).chat_template
    with torch.no_grad():
        merged_logits = merged(**sample_inputs(processor, tmp_path / "red.png")).logits
    assert (merged_logits - adapter_logits).abs().max() <= 1e-5


def test_printed_trainable_count_equals_peft_count(tiny_model_dir, tmp_path, caplog):
    cfg = lora_config(tmp_path, tiny_model_dir("llava"), lora_modules_to_save=["projector"])
    with caplog.at_level(logging.INFO, logger="mixtune"):
        trainer = build_trainer(cfg)
    printed = re.search(r"trainable parameters: ([\d,]+) of ([\d,]+)", caplog.text)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    assert (int(printed[1].replace(",", "")), int(printed[2].replace(",", ""))) == (trainable, total)
    # every adapter module is named in the log: 2 layers x 7 projections, folded per layer range
    names = adapter_names(trainer)
    assert len(names) == 14
    assert "model.language_model.layers.{0-1}.self_attn.q_proj" in caplog.text
    assert "trained fully beside the adapters: model.multi_modal_projector" in caplog.text


@pytest.mark.parametrize("family,targets,expected", [
    # the family default: the language model's attention and MLP projections only
    ("qwen2_vl", None, r"model\.language_model\.layers\.\d\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"),
    # all-linear: the language model's linear layers, not the vision tower, projector or lm_head
    ("llava", "all-linear", r"model\.language_model\.layers\.\d\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"),
    # a seed-style regex means what it means there: fullmatch over full names
    ("qwen2_vl", [".*attn.qkv.*"], r"model\.visual\.blocks\.\d\.attn\.qkv"),
    # containers (self_attn blocks) also match; they are skipped, their projections get adapters
    ("llava", [".*language_model.*self_attn.*"], r"model\.language_model\.layers\.\d\.self_attn\.[qkvo]_proj"),
])
def test_targets_resolve_to_exact_modules(tiny_model_dir, tmp_path, family, targets, expected):
    cfg = lora_config(tmp_path, tiny_model_dir(family), lora_target_modules=targets)
    trainer = build_trainer(cfg)
    names = adapter_names(trainer)
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir(family))
    base_linear = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
    assert names == [n for n in base_linear if re.fullmatch(expected, n)] and names
    # base weights frozen; only adapter weights train
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)


@pytest.mark.parametrize("key,value,message", [
    ("lora_target_modules", [".*nonexistent_proj.*"], r"pattern '\.\*nonexistent_proj\.\*' matches no module"),
    ("lora_target_modules", ["q_proj"], r"must match the whole name, e\.g\. '\.\*q_proj'"),
    ("lora_target_modules", [".*norm.*"], r"matches only modules LoRA cannot wrap"),
    ("lora_target_modules", ["(unclosed"], r"not a valid regex"),
    ("lora_modules_to_save", ["nothing_here"], r"'nothing_here' matches no module"),
])
def test_bad_targets_are_clear_errors_with_real_names(tiny_model_dir, tmp_path, capsys, key, value, message):
    cfg = write_config(tmp_path, tiny_model_dir("qwen2_vl"), repeated_data(tmp_path), lora=True, **{key: value})
    assert main(["train", cfg]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"config key '{key}'" in err
    assert re.search(message, err), err
    if "matches no module" in message and key == "lora_target_modules":
        assert "model.language_model.layers.0.self_attn.q_proj" in err  # real names to copy from


def test_freeze_globs_under_lora_freeze_adapters_but_never_unfreeze_base(tiny_model_dir, tmp_path, caplog):
    cfg = lora_config(tmp_path, tiny_model_dir("qwen2_vl"), lora_target_modules=[".*attn.qkv", ".*q_proj"],
                      freeze_include=["*visual*"], freeze_exclude=["*visual.merger*"])
    with caplog.at_level(logging.WARNING, logger="mixtune"):
        trainer = build_trainer(cfg)
    params = dict(trainer.model.get_base_model().named_parameters())
    visual = [n for n in params if ".lora_" in n and "visual" in n]
    language = [n for n in params if ".lora_" in n and "language_model" in n]
    assert visual and not any(params[n].requires_grad for n in visual)  # adapters frozen by the glob
    assert language and all(params[n].requires_grad for n in language)
    assert not any(p.requires_grad for n, p in params.items() if "merger" in n)  # exclude does not unfreeze
    assert "lora_modules_to_save" in caplog.text  # and the log says how to train it


def test_resume_lora_run_from_its_checkpoint(tiny_model_dir, tmp_path):
    import shutil

    data = repeated_data(tmp_path, n=16)
    common = dict(lora=True, max_steps=6, save_strategy="steps", save_steps=3, lr_scheduler_type="linear",
                  learning_rate=1e-2, lora_dropout=0.0)
    model = tiny_model_dir("qwen2_vl")
    train(load_config(write_config(tmp_path, model, data, output_dir=str(tmp_path / "full"), **common)))
    ckpt = tmp_path / "full" / "checkpoint-3"
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= set(os.listdir(ckpt))
    full_history = json.load(open(tmp_path / "full" / "metrics.json"))["log_history"]
    part_dir = tmp_path / "part"
    part_dir.mkdir()
    shutil.copytree(ckpt, part_dir / "checkpoint-3")
    train(load_config(write_config(tmp_path, model, data, output_dir=str(part_dir), resume_from_checkpoint=True,
                                   **common)))
    history = json.load(open(part_dir / "metrics.json"))["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4, 5, 6]
    full = {h["step"]: h["loss"] for h in full_history if "loss" in h}
    resumed = {h["step"]: h["loss"] for h in history if "loss" in h}
    assert full[4] < full[1]  # the adapters learned something worth losing
    for step in (4, 5, 6):
        # the adapter weights and optimizer came back: same losses as the uninterrupted run
        assert resumed[step] == pytest.approx(full[step], rel=1e-4), step


def test_merge_refuses_an_adapter_that_does_not_fit(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    cfg = lora_config(tmp_path, tiny_model_dir("qwen2_vl"), max_steps=1)
    train(cfg)
    out = cfg.training.output_dir
    # the tiny LLaVA's language model has the same module names and shapes: only the class tells them apart
    code = main(["merge-lora", "--model_name_or_path", tiny_model_dir("llava"), "--lora_path", out,
                 "--merge_model_path", str(tmp_path / "merged")])
    err = capsys.readouterr().err
    assert code == 2 and "trained on a Qwen2VLForConditionalGeneration" in err and "Traceback" not in err
    # an adapter file missing weights is an error, not peft's warning
    weights = load_file(os.path.join(out, "adapter_model.safetensors"))
    dropped = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, os.path.join(out, "adapter_model.safetensors"))
    assert main(["merge-lora", "--lora_path", out, "--merge_model_path", str(tmp_path / "merged")]) == 2
    assert "1 adapter weight(s) missing" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "merged")
    assert main(["merge-lora", "--lora_path", str(tmp_path), "--merge_model_path", str(tmp_path / "m2")]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err


def test_lora_keys_without_lora_are_noted_and_bad_values_refused(tiny_model_dir, tmp_path):
    from mixtune.errors import ConfigError

    cfg = load_config(write_config(tmp_path, tiny_model_dir("qwen2_vl"), repeated_data(tmp_path),
                                   lora_target_modules=["all-linear"]))
    assert any("no effect without 'lora: true'" in n for n in cfg.notes)
    for key, value in (("lora_rank", 0), ("lora_dropout", 1.0)):
        with pytest.raises(ConfigError, match=key):
            load_config(write_config(tmp_path, tiny_model_dir("qwen2_vl"), repeated_data(tmp_path), lora=True,
                                     **{key: value}))


def test_compact_names_and_exact_regex():
    names = [f"m.layers.{i}.attn.{p}" for i in range(4) for p in ("q", "k")]
    assert compact_names(names) == ["m.layers.{0-3}.attn.q", "m.layers.{0-3}.attn.k"]
    assert compact_names(["a.1.x", "a.3.x", "a.4.x"]) == ["a.{1,3-4}.x"]
    every = names + ["m.layers.0.mlp.up", "m.other.q"]
    assert exact_regex(names, every) == r"m\.layers\.\d+\.attn\.q|m\.layers\.\d+\.attn\.k"
    some = ["m.layers.0.attn.q", "m.layers.2.attn.q"]  # only some layers: names listed exactly
    assert {n for n in every if re.fullmatch(exact_regex(some, every), n)} == set(some)


@pytest.mark.slow
def test_demo_with_lora_learns(tmp_path):
    from mixtune.tools.demo import run_demo

    report = run_demo("qwen2_vl", str(tmp_path / "demo"), lora=True)
    assert report["lora"] and report["accuracy_after"] >= 0.9
