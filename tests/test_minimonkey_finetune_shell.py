"""PaddleMIX's MiniMonkey fine-tuning shell
(paddlemix/examples/minimonkey/shell/internvl2.0/2nd_finetune/minimonkey_2b_internlm2_1_8b_dynamic_res_2nd_finetune_full.sh)
as a mixtune config: each of its arguments translated (the table below says where each goes), run for 2 steps on the
tiny MiniMonkey. The shell's own environment defaults are used except GPUS=1 BATCH_SIZE=2 (one CPU process): its
gradient accumulation is BATCH_SIZE / PER_DEVICE_BATCH_SIZE / GPUS = 2 and sharding_parallel_degree GPUS = 1."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

import torch

from conftest import red_image
from mixtune.config import build_config
from mixtune.models.loading import load_model_and_processor
from mixtune.models.registry import get_family
from mixtune.train.freeze import part_of
from mixtune.train.run import train

GPUS, BATCH_SIZE, PER_DEVICE_BATCH_SIZE, TENSOR_PARALLEL_DEGREE = 1, 2, 1, 1
# The shell's arguments, as written (paths are the shell's; the test points them at local files)
SHELL_ARGS = {
    "do_train": True, "model_name_or_path": "OpenGVLab/InternVL2-2B", "conv_style": "internlm2-chat",
    "output_dir": "work_dirs/minimonkey-2B", "logging_dir": "work_dirs/minimonkey-2B/logs",
    "meta_path": "paddlemix/examples/minimonkey/shell/data/minimonkey_finetune_chartqa.json",
    "overwrite_output_dir": True, "force_image_size": 448, "max_dynamic_patch": 12, "down_sample_ratio": 0.5,
    "drop_path_rate": 0.1, "freeze_llm": False, "freeze_mlp": True, "freeze_backbone": True,
    "vision_select_layer": -1, "dataloader_num_workers": 1, "bf16": True, "fp16": False, "fp16_opt_level": "O1",
    "num_train_epochs": 1, "per_device_train_batch_size": PER_DEVICE_BATCH_SIZE,
    "gradient_accumulation_steps": BATCH_SIZE // PER_DEVICE_BATCH_SIZE // GPUS, "recompute": False,
    "max_grad_norm": 1.0, "evaluation_strategy": "no", "save_strategy": "epoch", "save_steps": 2000,
    "save_total_limit": 1, "learning_rate": 4e-8, "weight_decay": 0.01, "warmup_ratio": 0.03, "optim": "adamw",
    "lr_scheduler_type": "cosine", "logging_steps": 1, "max_seq_length": 8192, "grad_checkpoint": True,
    "group_by_length": True, "dynamic_image_size": True, "use_thumbnail": True, "ps_version": "v2",
    "report_to": "visualdl", "tensor_parallel_degree": TENSOR_PARALLEL_DEGREE,
    "sharding_parallel_degree": GPUS // TENSOR_PARALLEL_DEGREE, "pipeline_parallel_degree": 1,
    "sep_parallel_degree": 1, "sharding": "stage1", "amp_master_grad": 1,
    "hybrid_parallel_topo_order": "sharding_first",
}
# shell argument -> mixtune config key (same value unless a function is given)
RENAMED = {"freeze_backbone": "freeze_vision", "freeze_mlp": "freeze_projector", "max_seq_length": "max_length",
           "grad_checkpoint": "gradient_checkpointing", "group_by_length": "group_by_modality_length",
           "optim": ("optim", {"adamw": "adamw_torch"}.get),
           # VisualDL is Paddle's scalar logger; its Trainer counterpart (tensorboard) is not installed here, and the
           # scalars stay in trainer_state.json's log_history either way
           "report_to": ("report_to", {"visualdl": "none"}.get)}
# Arguments that describe the checkpoint, not the run: InternVL2 keeps them in config.json / the processor, and
# the translation checks the checkpoint agrees (the tiny one has 112-pixel tiles and at most 4 detail tiles
# where InternVL2-2B has 448 and 12, and no other difference).
CHECKPOINT_ARGS = {"conv_style": "template", "down_sample_ratio": "downsample_ratio",
                   "vision_select_layer": "select_layer", "ps_version": "ps_version",
                   "dynamic_image_size": "dynamic_image_size", "use_thumbnail": "use_thumbnail",
                   "force_image_size": "force_image_size", "max_dynamic_patch": "max_dynamic_patch"}
TINY_SIZES = {"force_image_size": 112, "max_dynamic_patch": 4}
# PaddleNLP's own: a log folder (the Trainer logs to output_dir), the hybrid-parallel layout of one process,
# and freeze_llm False (the language model trains unless frozen). `sharding: stage1` over
# sharding_parallel_degree = GPUS = 1 shards nothing; on several GPUs it is mixtune's `sharding: stage1` (DeepSpeed
# ZeRO-1, which needs a process group: tests/test_distributed.py runs sharding under its launcher).
DROPPED = {"logging_dir", "sep_parallel_degree", "hybrid_parallel_topo_order", "freeze_llm", "sharding"}


def translate(shell: dict, meta: dict, model_dir: str, output_dir: str) -> dict:
    """The shell's arguments as a mixtune config: `meta_path`'s datasets become dataset entries (InternVL's jsonl
    annotations are LLaVA-style records; `root` is the image folder; data_augment false is mixtune's transform),
    `drop_path_rate` goes into the vision tower's config as PaddleMIX's script puts it there."""
    from transformers import AutoProcessor

    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    images = AutoProcessor.from_pretrained(model_dir).image_processor  # the tiles are the processor's business
    for arg, key in CHECKPOINT_ARGS.items():
        have = config.get(key)
        if arg in ("force_image_size", "max_dynamic_patch", "dynamic_image_size", "use_thumbnail"):
            have = getattr(images, "image_size" if arg == "force_image_size" else arg)
        assert have == TINY_SIZES.get(arg, shell[arg]), (arg, have)
    config["vision_config"]["drop_path_rate"] = shell["drop_path_rate"]
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(config, f)
    raw = {}
    for arg, value in shell.items():
        if arg in CHECKPOINT_ARGS or arg in DROPPED or arg in ("drop_path_rate", "meta_path"):
            continue
        key = RENAMED.get(arg, arg)
        if isinstance(key, tuple):
            key, value = key[0], key[1](value)
        raw[key] = value
    raw["dataset"] = {"train": [{"name": "llava", "data_files": d["annotation"], "image_root": d["root"],
                                 "repeat": d["repeat_time"]} for d in meta.values()]}
    return {**raw, "model_name_or_path": model_dir, "output_dir": output_dir}


def test_minimonkey_finetune_shell_trains_2_steps(tiny_model_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    model_dir = str(tmp_path / "model")
    shutil.copytree(tiny_model_dir("minimonkey"), model_dir)
    (tmp_path / "images").mkdir()
    red_image(tmp_path / "images" / "red.png")
    records = [{"id": i, "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the chart?"}, {"from": "gpt", "value": "red"}]}
        for i in range(2)]
    (tmp_path / "chartqa.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    # the shipped minimonkey_finetune_chartqa.json, paths local
    meta = {"chartqa_train_18k": {"root": str(tmp_path / "images"), "annotation": str(tmp_path / "chartqa.jsonl"),
                                  "data_augment": False, "repeat_time": 1, "length": 18317}}
    raw = translate(SHELL_ARGS, meta, model_dir, str(tmp_path / "out"))
    target = {arg: (lambda k: k[0] if isinstance(k, tuple) else k)(RENAMED.get(arg, arg)) for arg in SHELL_ARGS}
    not_in_config = {arg for arg in SHELL_ARGS if target[arg] not in raw}
    assert not_in_config == set(CHECKPOINT_ARGS) | DROPPED | {"drop_path_rate", "meta_path"}  # each has its place
    config = build_config({**raw, "max_steps": 2}, base_dir=str(tmp_path))
    assert config.training.gradient_accumulation_steps == 2 and config.training.bf16
    metrics = train(config)
    with open(tmp_path / "out" / "trainer_state.json") as f:
        assert json.load(f)["global_step"] == 2
    assert metrics["train_loss"] > 0
    # freeze_backbone / freeze_mlp as PaddleMIX's: the run trained exactly the language model (the log's parameter
    # summary), and the vision tower and projector come back as they went in
    family = get_family("minimonkey")
    summary = next(r.getMessage() for r in caplog.records if "trainable parameters:" in r.getMessage())
    groups = dict(re.findall(r"^  (\S+): ([\d,]+ / [\d,]+) trainable$", summary, re.M))
    _, base, _ = load_model_and_processor(model_dir)
    parts = {n: part_of(n, family) for n, _ in base.named_parameters()}
    for group, counts in groups.items():
        trained, total = (int(x.replace(",", "")) for x in counts.split(" / "))
        expected = sum(p.numel() for n, p in base.named_parameters() if n.startswith(group + ".")
                       and parts[n] == "language")
        assert trained == expected and total > 0, (group, counts)
    assert set(groups) >= {"vision_model.embeddings", "mlp1.0", "language_model.model"}
    loaded_family, tuned, _ = load_model_and_processor(str(tmp_path / "out"))
    assert loaded_family is family and type(tuned).__name__ == "MiniMonkeyChatModel"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        saved_dtype = f.get_tensor("mlp1.0.weight").dtype  # the Trainer saves the weights' own dtype
    tuned_params = dict(tuned.named_parameters())
    for name, p in base.named_parameters():
        if parts[name] != "language":
            assert torch.equal(tuned_params[name], p.detach().to(saved_dtype).float()), name
