"""PaddleMIX's shipped configs (paddlemix/config/*, keys and values as shipped) run after changing only the
model and data paths: each trains 2 steps on the matching tiny family, or fails with one clear message that
carries the fix to paste; after pasting it, it trains.

The harness changes paths (model_name_or_path, data_files, output_dir) and adds `max_steps: 2` so that every
config stops after 2 optimizer steps. VisualGLM's run unchanged on mixtune's native VisualGLM-6B port
(mixtune.native.visualglm), and on BLIP-2's tiny ViT + Q-Former + OPT after pasting fixes. InternLM-XComposer2 has
no transformers family: it runs on LLaVA's CLIP ViT + projector + LLM. Qwen-VL's run on mixtune's native Qwen-VL
port (mixtune.native.qwen_vl) unchanged, and on Qwen2-VL
after pasting the renames the messages give; BLIP-2's OPT on the tiny OPT, InternVL2 on the
transformers-native InternVL.
"""

import json
import re

import pytest

from conftest import red_image, write_json
from mixtune.config import build_config
from mixtune.errors import MixtuneError
from mixtune.train.run import train

COMMON_EVAL = {"per_device_eval_batch_size": 1, "eval_accumulation_steps": 16, "do_train": True, "do_eval": False,
               "disable_tqdm": True, "save_total_limit": 1}
CHATML = {"train": [{"name": "chatml_dataset", "data_files": "train.json", "chat_template": "chat_template.json"}],
          "eval": [{"name": "chatml_dataset", "data_files": "val.json", "chat_template": "chat_template.json"}]}
LLAVA_LORA_TARGETS = ["llama.layer.*q_proj.*", "llama.layer.*k_proj.*", "llama.layer.*v_proj.*",
                      "llama.layer.*gate_proj.*", "llama.layer.*up_proj.*", "llama.layer.*down_proj.*",
                      "llama.layer.*o_proj.*"]
LLAVA_SFT = {"model_name_or_path": "paddlemix/llava/llava-v1.5-7b", "dataset": CHATML, "mixtoken": False,
             "output_dir": "./checkpoints/llava_sft_ckpts", "overwrite_output_dir": True, "recompute": True,
             "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "group_by_modality_length": False,
             "num_train_epochs": 1, "learning_rate": 2e-05, "warmup_ratio": 0.03, "lr_scheduler_type": "cosine",
             "logging_steps": 1, "save_steps": 100, "evaluation_strategy": "epoch", "save_strategy": "epoch",
             "max_length": 2048, "fp16": False, "fp16_opt_level": "O1", **COMMON_EVAL}
LLAVA_LORA = {**{k: v for k, v in LLAVA_SFT.items() if k != "group_by_modality_length"}, "learning_rate": 2e-04,
              "mm_projector_lr": 2e-5, "weight_decay": 0.0, "bf16": False, "load_best_model_at_end": False,
              "eval_with_do_generation": False, "skip_memory_metrics": False, "benchmark": False, "lora": True,
              "lora_rank": 128, "lora_alpha": 256, "lora_dropout": 0.0, "lora_target_modules": LLAVA_LORA_TARGETS}
del LLAVA_LORA["fp16"]
QWEN_VL_SFT = {"model_name_or_path": "qwen-vl/qwen-vl-chat-7b", "freeze_include": ["*visual*"],
               "freeze_exclude": ["*visual.attn_pool*"], "dataset": CHATML, "mixtoken": True,
               "output_dir": "./checkpoints/qwen_vl_sft_ckpts", "overwrite_output_dir": True,
               "per_device_train_batch_size": 1, "gradient_accumulation_steps": 16, "num_train_epochs": 10,
               "learning_rate": 1e-05, "weight_decay": 0.1, "adam_beta2": 0.95, "warmup_ratio": 0.01,
               "lr_scheduler_type": "cosine", "logging_steps": 1, "save_steps": 100, "evaluation_strategy": "epoch",
               "save_strategy": "epoch", "max_length": 2048, "bf16": True, "fp16_opt_level": "O1",
               "load_best_model_at_end": False, "eval_with_do_generation": False, "skip_memory_metrics": False,
               "benchmark": False, **COMMON_EVAL}
QWEN_VL_LORA = {**{k: v for k, v in QWEN_VL_SFT.items() if not k.startswith("freeze")}, "num_train_epochs": 1,
                "lora": True, "lora_rank": 64, "lora_alpha": 16, "lora_dropout": 0.05,
                "lora_target_modules": [".*attn.c_attn.*", ".*attn.c_proj.*", ".*mlp.w1.*", ".*mlp.w2.*"]}
INTERNVL2_SFT = {"model_name_or_path": "OpenGVLab/InternVL2-8B", "dataset": CHATML, "use_flash_attention": False,
                 "mixtoken": False, "output_dir": "./checkpoints/internvl2_sft_ckpts", "overwrite_output_dir": True,
                 "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "num_train_epochs": 1,
                 "learning_rate": 1e-05, "weight_decay": 0.1, "adam_beta2": 0.95, "warmup_ratio": 0.0,
                 "lr_scheduler_type": "cosine", "logging_steps": 1, "save_steps": 100,
                 "evaluation_strategy": "epoch", "save_strategy": "epoch", "max_length": 4096, "bf16": True,
                 "fp16_opt_level": "O2", "load_best_model_at_end": False, "eval_with_do_generation": False,
                 "skip_memory_metrics": False, **COMMON_EVAL}
XCOMPOSER2_SFT = {**INTERNVL2_SFT, "model_name_or_path": "internlm/internlm-xcomposer2-7b",
                  "freeze_exclude": ["*vit*"], "output_dir": "./checkpoints/internlm_xcomposer_sft_ckpts",
                  "fp16_opt_level": "O1", "dataset": {
                      "train": [{"name": "chatml_dataset", "data_files": "path/to/train.json"}],
                      "eval": [{"name": "chatml_dataset", "data_files": "path/to/eval.json"}]}}
del XCOMPOSER2_SFT["use_flash_attention"]
BLIP2_SFT = {"model_name_or_path": "paddlemix/blip2-pretrained-opt2.7b", "text_model_name_or_path": "facebook/opt-2.7b",
             "dataset": {"train": [{"name": "coco_caption", "splits": "train"}],
                         "eval": [{"name": "coco_caption", "splits": "val"}]},
             "output_dir": "./checkpoints/blip2_sft_ckpts", "overwrite_output_dir": True,
             "per_device_train_batch_size": 32, "gradient_accumulation_steps": 1, "per_device_eval_batch_size": 128,
             "eval_accumulation_steps": 16, "num_train_epochs": 10, "learning_rate": 1e-03, "weight_decay": 0.05,
             "adam_beta2": 0.95, "eta_min": 1e-5, "warmup_start_lr": 1e-6, "lr_scheduler_name": "CosineDecayWithWarmup",
             "logging_steps": 1, "save_steps": 10, "evaluation_strategy": "steps", "save_strategy": "steps",
             "max_length": 2048, "fp16": True, "fp16_opt_level": "O1", "do_train": True, "do_eval": False,
             "do_predict": False, "disable_tqdm": True, "load_best_model_at_end": True,
             "eval_with_do_generation": False, "save_total_limit": 1}
BLIP2_LORA = {**BLIP2_SFT, "lora": True, "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.05,
              "lora_target_modules": ["language_model.opt.decoder.layers.*.self_attn.q_proj.*",
                                      "language_model.opt.decoder.layers.*.self_attn.v_proj.*"]}
VQA = {"train": [{"name": "coco_vqa", "data_files": "train.json"}],
       "eval": [{"name": "coco_vqa", "data_files": "val.json"}]}
VISUALGLM_SFT = {"model_name_or_path": "THUDM/visualglm-6b", "dataset": VQA, "freeze_include": ["*vision_model*"],
                 "mixtoken": True, "output_dir": "./checkpoints/visualglm-6b_sft_ckpts", "overwrite_output_dir": True,
                 "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4, "per_device_eval_batch_size": 1,
                 "eval_accumulation_steps": 16, "num_train_epochs": 2, "learning_rate": 3e-04, "warmup_steps": 30,
                 "logging_steps": 1, "save_steps": 10, "evaluation_strategy": "steps", "save_strategy": "steps",
                 "src_length": 1024, "max_length": 2048, "fp16": True, "fp16_opt_level": "O2", "do_train": True,
                 "do_eval": False, "disable_tqdm": True, "load_best_model_at_end": True,
                 "eval_with_do_generation": False, "save_total_limit": 1}
VISUALGLM_LORA = {**{k: v for k, v in VISUALGLM_SFT.items() if k != "freeze_include"}, "num_train_epochs": 30,
                  "warmup_ratio": 0.02, "lr_scheduler_type": "cosine", "save_steps": 5, "lora": True,
                  "lora_target_modules": [".*query_key_value.*", ".*dense.*", ".*dense_h_to_4h", ".*dense_4h_to_h"]}
del VISUALGLM_LORA["warmup_steps"]
LLAVA_PRETRAIN = {"model_name_or_path": "paddlemix/llava/vicuna-13b-v1.5", "freeze_include": ["*llama*", "*lm_head*"],
                  "freeze_exclude": ["*llama.mm_projector*"],
                  "dataset": {"train": [{"name": "chatml_dataset", "data_files": "train.json"}],
                              "eval": [{"name": "chatml_dataset", "data_files": "val.json"}]},
                  "mixtoken": False, "output_dir": "./checkpoints/llava_pretrain_ckpts", "overwrite_output_dir": True,
                  "recompute": True, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
                  "group_by_modality_length": False, "num_train_epochs": 1, "learning_rate": 1e-03,
                  "warmup_ratio": 0.03, "lr_scheduler_type": "cosine", "logging_steps": 1, "save_steps": 100,
                  "evaluation_strategy": "no", "save_strategy": "epoch", "max_length": 2048, "fp16": False,
                  "fp16_opt_level": "O1", **COMMON_EVAL, "eval_steps": 120}

# shipped config -> (tiny family it runs on, the fixes its messages told us to paste, in order)
SHIPPED = {
    "llava/v1_5/sft_argument.json": ("llava", LLAVA_SFT, []),
    "llava/v1_5/lora_sft_argument.json": ("llava", LLAVA_LORA, [
        {"lora_target_modules": [p.replace("llama.layer", "model.language_model.layer") for p in LLAVA_LORA_TARGETS]}]),
    "llava/v1_6/sft_argument.json": ("llava_next", {**LLAVA_SFT, "model_name_or_path": "llava-v1.6-vicuna-7b"}, []),
    "llava/v1_6/lora_sft_argument.json": ("llava_next", LLAVA_LORA, [
        {"lora_target_modules": [p.replace("llama.layer", "model.language_model.layer") for p in LLAVA_LORA_TARGETS]}]),
    "llava/pretrain.json": ("llava", LLAVA_PRETRAIN, [
        {"freeze_include": ["*model*", "model.language_model.embed_tokens.weight"],
         "freeze_exclude": ["*model.multi_modal_projector*"]}]),
    # on mixtune's native Qwen-VL port: the original module names, so nothing to paste
    "qwen_vl/sft_argument.json": ("qwen_vl", QWEN_VL_SFT, []),
    "qwen_vl/lora_sft_argument.json": ("qwen_vl", QWEN_VL_LORA, []),
    # the same configs on Qwen2-VL: the messages translate Qwen-VL's names
    "qwen_vl/sft_argument.json@qwen2_vl": ("qwen2_vl", QWEN_VL_SFT, [{"freeze_exclude": ["*visual.merger*"]}]),
    "qwen_vl/lora_sft_argument.json@qwen2_vl": ("qwen2_vl", QWEN_VL_LORA, [
        {"lora_target_modules": [".*self_attn.(q_proj|k_proj|v_proj).*", ".*self_attn.o_proj.*", ".*mlp.up_proj.*",
                                 ".*mlp.gate_proj.*"]}]),
    "internvl2/sft_argument.json": ("internvl", INTERNVL2_SFT, []),
    "internlm_xcomposer2/sft_argument.json": ("llava", XCOMPOSER2_SFT, [{"freeze_exclude": ["*vision_tower*"]}]),
    "blip2/sft_argument.json": ("blip-2", BLIP2_SFT, []),
    "blip2/lora_sft_argument.json": ("blip-2", BLIP2_LORA, [
        {"lora_target_modules": ["language_model.model.decoder.layers.*.self_attn.q_proj.*",
                                 "language_model.model.decoder.layers.*.self_attn.v_proj.*"]}]),
    # on mixtune's native VisualGLM-6B port: PaddleMIX's names are read through the port's name map (MixToken
    # packs exactly), so nothing to paste
    "visualglm/sft_argument.json": ("visualglm", VISUALGLM_SFT, []),
    "visualglm/lora_sft_argument.json": ("visualglm", VISUALGLM_LORA, []),
    # the same configs on BLIP-2's tiny ViT + Q-Former + OPT
    "visualglm/sft_argument.json@blip-2": ("blip-2", VISUALGLM_SFT, [{"mixtoken": False}]),
    "visualglm/lora_sft_argument.json@blip-2": ("blip-2", VISUALGLM_LORA, [
        {"mixtoken": False},
        {"lora_target_modules": [".*language_model.*self_attn.(q_proj|k_proj|v_proj).*", ".*dense.*",
                                 ".*language_model.*fc1", ".*language_model.*fc2"]}]),
}

# What each family's PaddleMIX-style chat_template.json looks like (the shipped configs name one; PaddleMIX
# ships it with the data, so the test writes a typical one).
TEMPLATES = {
    "llava": {"system": "A chat between a curious human and an artificial intelligence assistant. ",
              "conversation": ["USER: {{user}} ASSISTANT:", " {{bot}}</s>"], "query": "USER: {{query}} ASSISTANT:"},
    "chatml": {"system": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
               "conversation": ["<|im_start|>user\n{{user}}<|im_end|>\n<|im_start|>assistant\n", "{{bot}}<|im_end|>\n"],
               "query": "<|im_start|>user\n{{query}}<|im_end|>\n<|im_start|>assistant\n"},
}


def with_local_paths(raw: dict, model_dir: str, tmp_path) -> dict:
    """The shipped config with only paths changed: the model, each entry's data_files (written here), and
    output_dir. `max_steps: 2` is the harness's own addition."""
    img = red_image(tmp_path / "red.png")
    records = {
        "chatml_dataset": [{"image": img, "conversations": [["<image>What colour is it?", "red"]]}] * 2,
        "coco_caption": [{"image": img, "caption": "a red square"}] * 2,
        "coco_vqa": [{"image": img, "question": "What colour is it?", "answer": "red"}] * 2,
    }
    dataset = {}
    for split, entries in raw["dataset"].items():
        dataset[split] = []
        for i, entry in enumerate(entries):
            data = write_json(tmp_path / f"{split}{i}.json", records[entry["name"]])
            dataset[split].append({**entry, "data_files": data})
    family = "llava" if "llava" in model_dir else "chatml"
    write_json(tmp_path / "chat_template.json", TEMPLATES[family])
    return {**raw, "model_name_or_path": model_dir, "dataset": dataset, "output_dir": str(tmp_path / "out"),
            "max_steps": 2}


def pasted_fix(message: str) -> dict:
    """The fix a message tells the user to paste: `"key": value, ...` after 'write:', or 'set key: value'."""
    if "write:\n" in message:
        return json.loads("{" + message.split("write:\n", 1)[1].strip() + "}")
    found = re.search(r"set (\w+): (\w+)", message)
    assert found, f"no fix to paste in: {message}"
    return {found[1]: json.loads(found[2])}


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_paddlemix_config_trains_2_steps(name, tiny_model_dir, tmp_path):
    family, shipped, expected_fixes = SHIPPED[name]
    raw = with_local_paths(shipped, tiny_model_dir(family), tmp_path)
    fixes = []
    for _ in range(len(expected_fixes) + 1):
        try:
            config = build_config(raw, base_dir=str(tmp_path))
            trainer_metrics = train(config)
            break
        except MixtuneError as e:
            fix = pasted_fix(str(e))
            fixes.append(fix)
            raw = {**raw, **fix}
    else:
        pytest.fail(f"{name} still fails after pasting {fixes}")
    assert fixes == expected_fixes
    with open(tmp_path / "out" / "trainer_state.json", encoding="utf-8") as f:
        state = json.load(f)
    assert state["global_step"] == 2
    assert trainer_metrics["train_loss"] > 0
    if name in TRAINED_PARTS:  # the freeze settings did what PaddleMIX's do
        assert moved_parts(tiny_model_dir(family), str(tmp_path / "out"), family) == TRAINED_PARTS[name]


# full-weight configs with freeze settings -> the parts whose weights the 2 steps changed
TRAINED_PARTS = {
    "llava/pretrain.json": {"projector"},  # PaddleMIX's LLaVA stage 1: only the projector trains
    "qwen_vl/sft_argument.json": {"projector", "language"},  # ViT frozen, its attn_pool resampler trains
    "qwen_vl/sft_argument.json@qwen2_vl": {"projector", "language"},  # vision tower frozen, its merger trains
    "internlm_xcomposer2/sft_argument.json": {"vision", "projector", "language"},
    "visualglm/sft_argument.json": {"projector", "language"},  # ViT frozen; Q-Former, glm_proj and ChatGLM train
    "visualglm/sft_argument.json@blip-2": {"projector", "language"},
    "llava/v1_5/sft_argument.json": {"vision", "projector", "language"},
}


def moved_parts(base_dir: str, out_dir: str, family: str) -> set:
    import torch
    from transformers import AutoModelForImageTextToText

    from mixtune.models.registry import get_family
    from mixtune.train.freeze import part_of

    base = dict(AutoModelForImageTextToText.from_pretrained(base_dir).named_parameters())
    tuned = dict(AutoModelForImageTextToText.from_pretrained(out_dir).named_parameters())
    return {part_of(n, get_family(family)) for n in base if not torch.equal(base[n], tuned[n])}
