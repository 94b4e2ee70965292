"""Per-part learning rates (vision_lr, projector_lr, language_lr; PaddleMIX's mm_projector_lr)."""

import pytest
import torch

from conftest import red_image, write_config, write_json
from mixtune.config import load_config
from mixtune.models.registry import get_family
from mixtune.train.freeze import part_of
from mixtune.train.lora import original_name
from mixtune.train.run import build_trainer

RATES = {"vision": 1e-3, "projector": 5e-2, "language": 1e-2}


def config(tmp_path, model_dir, **kw):
    img = red_image(tmp_path / "red.png")
    data = write_json(tmp_path / "train.json",
                      [{"image": img, "conversations": [["<image>What colour?", "red"]]}] * 4)
    kw = {"optim": "sgd", "weight_decay": 0.1, "lr_scheduler_type": "constant", "learning_rate": 1e-4, **kw}
    return load_config(write_config(tmp_path, model_dir, data, **kw))


def one_sgd_step(trainer):
    """One optimizer step of the trainer's own optimizer on a real batch; returns (before, grads)."""
    model = trainer.model
    optimizer = trainer.create_optimizer()
    batch = next(iter(trainer.get_train_dataloader()))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    model(**batch).loss.backward()
    # None: unused in the forward (LLaVA reads the second-to-last vision layer); SGD leaves those alone
    grads = {n: None if p.grad is None else p.grad.detach().clone()
             for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    return before, grads


@pytest.mark.parametrize("lora", [False, True])
def test_groups_carry_part_rates_and_parts_move_at_their_rate(tiny_model_dir, tmp_path, lora):
    fam = get_family("llava")
    extra = {"lora": True, "lora_target_modules": ["all-linear", r".*vision_tower.*self_attn\.(q_proj|v_proj)"],
             "lora_modules_to_save": ["projector"], "lora_dropout": 0.0} if lora else {}
    cfg = config(tmp_path, tiny_model_dir("llava"), **{f"{p}_lr": r for p, r in RATES.items()}, **extra)
    trainer = build_trainer(cfg)
    before, grads = one_sgd_step(trainer)

    # every trainable parameter sits in exactly one group, whose lr is its part's rate
    lr_of = {}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in lr_of
            lr_of[id(p)] = (group["lr"], group["weight_decay"])
    seen_parts = set()
    for name, param in trainer.model.named_parameters():
        if not param.requires_grad:
            continue
        part = part_of(original_name(name), fam)
        seen_parts.add(part)
        lr, wd = lr_of[id(param)]
        assert lr == RATES[part], name
        # SGD: the update is -lr * (grad + weight_decay * param) (decoupled decay is not SGD's way: torch adds it)
        grad = grads[name]
        expected = before[name] if grad is None else before[name] - lr * (grad + wd * before[name])
        torch.testing.assert_close(param.detach(), expected, rtol=1e-5, atol=1e-8)
    assert seen_parts == {"vision", "projector", "language"}
    # each part really moved (a nonzero update), so the rates above were exercised
    moved = {part_of(original_name(n), fam) for n, p in trainer.model.named_parameters()
             if p.requires_grad and not torch.equal(p.detach(), before[n])}
    assert moved == {"vision", "projector", "language"}
    # weight decay grouping is kept: biases and norms are not decayed
    decays = {name: lr_of[id(p)][1] for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert all(wd == 0.0 for n, wd in decays.items() if n.endswith("bias") or "norm" in n)
    assert any(wd == 0.1 for wd in decays.values())


def test_rate_zero_leaves_a_part_unchanged_while_others_train(tiny_model_dir, tmp_path):
    from mixtune.train.run import train
    from transformers import AutoModelForImageTextToText

    cfg = config(tmp_path, tiny_model_dir("llava"), vision_lr=0.0, max_steps=2, learning_rate=1e-2)
    train(cfg)
    base = dict(AutoModelForImageTextToText.from_pretrained(tiny_model_dir("llava")).named_parameters())
    tuned = dict(AutoModelForImageTextToText.from_pretrained(cfg.training.output_dir).named_parameters())
    fam = get_family("llava")
    moved = {part_of(n, fam) for n in base if not torch.equal(base[n], tuned[n])}
    assert moved == {"projector", "language"}


def test_mm_projector_lr_is_the_projector_rate(tiny_model_dir, tmp_path):
    cfg = config(tmp_path, tiny_model_dir("llava"), mm_projector_lr=2e-5)
    assert cfg.mix.projector_lr == 2e-5
    groups = build_trainer(cfg).create_optimizer().param_groups
    assert {g.get("part"): g["lr"] for g in groups} == {"projector": 2e-5, None: 1e-4}


def test_mm_projector_lr_with_lora_trains_the_projector_fully_as_paddlemix_does(tiny_model_dir, tmp_path):
    cfg = config(tmp_path, tiny_model_dir("llava"), mm_projector_lr=2e-5, lora=True)
    assert cfg.mix.lora_modules_to_save == ["projector"]
    assert any("trains fully beside the adapters" in n for n in cfg.notes)
    trainer = build_trainer(cfg)
    groups = trainer.create_optimizer().param_groups
    projector = [p for g in groups if g.get("part") == "projector" for p in g["params"]]
    assert projector and all(g["lr"] == 2e-5 for g in groups if g.get("part") == "projector")
    n_projector = sum(p.numel() for n, p in trainer.model.named_parameters()
                      if "multi_modal_projector" in n and "modules_to_save" in n)
    assert sum(p.numel() for p in projector) == n_projector


def test_negative_part_rate_is_refused(tmp_path):
    from mixtune.config import build_config
    from mixtune.errors import ConfigError

    with pytest.raises(ConfigError, match="'vision_lr': must be >= 0"):
        build_config({"model_name_or_path": "m", "dataset": {"train": []}, "vision_lr": -1.0})
