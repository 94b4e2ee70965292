"""`mixtune init`: a commented starter config for one model family, which trains as written once the checkpoint
and the data path are filled in.

The config is built from the family's own record (its task, named parts, LoRA defaults, whether it packs, the
media it reads), so a new family gets a starter without an entry here; a new *task* needs one function in
STARTERS (its dataset entry and usual settings). Every key written is one the schema accepts
(tests/test_init.py checks them and trains each family's starter on its tiny checkpoint).
"""

from __future__ import annotations

import os

from mixtune.errors import MixtuneError

FILL_IN = "FILL_IN"  # the two values a user must replace


def media_examples(family) -> list[str]:
    """One data record per media kind the family reads, for the comment under data_files."""
    kinds = family.media_kinds
    examples = []
    if "image" in kinds:
        examples += ['{"image": "a.jpg", "conversations": [["<image>What is this?", "A cat."]]}',
                     '{"messages": [{"role": "user", "content": "<image>What is this?"}, '
                     '{"role": "assistant", "content": "A cat."}], "images": ["a.jpg"]}']
    if "video" in kinds:
        examples.append('{"video": "clip.mp4", "conversations": [["<video>Which way does it move?", "Left."]]}')
    if "audio" in kinds:
        examples.append('{"messages": [{"role": "user", "content": "<audio>What is said?"}, '
                        '{"role": "assistant", "content": "Hello."}], "audios": ["a.wav"]}')
    return examples


def parts_lines(family, frozen: tuple[str, ...]) -> list[str]:
    lines = ["# freeze whole parts of the model by the family's parameter globs (`freeze_include` / "
             "`freeze_exclude` take globs too)"]
    from mixtune.config import MixtuneArgs

    keys = MixtuneArgs.__dataclass_fields__
    for part, globs in family.named_parts().items():
        if f"freeze_{part}" not in keys:  # a part without a shortcut key: globs only
            lines.append(f"# to freeze the {part} part: freeze_include: {list(globs)}")
            continue
        lines.append(f"freeze_{part}: {'true' if part in frozen else 'false'}    # {', '.join(globs)}")
    return lines


def lora_lines(family, learning_rate: str) -> list[str]:
    parts = " / ".join(family.named_parts())
    return [
        "# LoRA: adapters on the family's default targets; the base weights stay frozen",
        "lora: true",
        "lora_rank: 8",
        "lora_alpha: 16",
        "lora_dropout: 0.05",
        f"# lora_target_modules: '{family.lora_targets}'    # the default (regexes over module names), or all-linear",
        f"# lora_modules_to_save: [{next(iter(family.named_parts()))}]    # parts trained fully beside the "
        f"adapters: {parts}, or module regexes",
        f"learning_rate: {learning_rate}",
    ]


# what every starter writes after its own settings
LOG_SAVE = ("logging_steps: 10", "save_strategy: epoch", "save_total_limit: 2")
PRECISION_LOG_SAVE = ("bf16: true    # false on GPUs without bf16; on a CPU bf16 runs but slowly", *LOG_SAVE)


def chat_starter(family, lora: bool, mixtoken: bool) -> list[str]:
    lines = ["dataset:", "  train:", "    - name: chatml_dataset",
             f"      data_files: {FILL_IN}    # a JSON list or JSONL file (a path, a glob or a list), one sample per "
             "record, e.g.:"]
    lines += [f"      #   {example}" for example in media_examples(family)]
    lines += ["      # media paths are relative to the data file's folder (or set image_root)"]
    if not family.uses_chat_template:
        lines.append("      # this family's prompts are prefix/suffix: one user turn and one reply per sample")
    lines += ["  # eval:", "  #   - name: chatml_dataset", "  #     data_files: val.json    # then set eval_strategy",
              "", f"output_dir: output/{family.name}_{'lora' if lora else 'sft'}",
              "per_device_train_batch_size: 1" + ("    # with mixtoken: rows of max_length tokens" if mixtoken else ""),
              "gradient_accumulation_steps: 16",
              "num_train_epochs: 1",
              "lr_scheduler_type: cosine",
              "warmup_steps: 0.03    # below 1: a ratio of all steps",
              "bf16: true    # false on GPUs without bf16 (V100, T4: use fp16: true); on a CPU bf16 runs but slowly",
              "max_length: 2048    # longest sample in tokens, image tokens included; longer ones are dropped and "
              "reported",
              *LOG_SAVE,
              "# eval_strategy: epoch",
              "# activation_checkpointing: true    # less memory, about a third more time (PaddleMIX: recompute)",
              ""]
    if mixtoken:
        lines += ["mixtoken: true    # pack several samples per row (exact: samples never see each other)", ""]
    lines += lora_lines(family, "1.0e-04") if lora else \
        ["learning_rate: 1.0e-05", *parts_lines(family, ("vision",))]
    return lines


def contrastive_starter(family, lora: bool, mixtoken: bool) -> list[str]:
    lines = ["dataset:", "  train:", "    - name: coco_caption",
             f"      data_files: {FILL_IN}    # image-text pairs: JSONL of "
             '{"image": "a.jpg", "caption": "a red square"} (a caption may be a list), or a COCO captions JSON',
             "  # eval:    # adds retrieval recall: eval_t2i_r1/5/10, eval_i2t_r1/5/10",
             "  #   - name: coco_caption", "  #     data_files: val.jsonl",
             "", f"output_dir: output/{family.name}_contrastive",
             "per_device_train_batch_size: 32    # every other pair of the batch is a negative: larger is better",
             "gradient_accumulation_steps: 1    # accumulation adds no negatives",
             "num_train_epochs: 5",
             "lr_scheduler_type: cosine",
             "warmup_steps: 0.1    # below 1: a ratio of all steps",
             "weight_decay: 0.1",
             *PRECISION_LOG_SAVE,
             "# eval_strategy: epoch",
             ""]
    lines += lora_lines(family, "1.0e-04") if lora else ["learning_rate: 1.0e-05", *parts_lines(family, ())]
    return lines


def classification_starter(family, lora: bool, mixtoken: bool) -> list[str]:
    lines = ["dataset:", "  train:", "    - name: imagefolder",
             f"      data_files: {FILL_IN}    # a folder of class folders (train/cat/1.jpg, train/dog/2.jpg); or "
             'name: image_label with a JSONL of {"image": "a.jpg", "label": "cat"}',
             "  # eval:    # adds eval_top1 (and eval_top5 above five classes)",
             "  #   - name: imagefolder", "  #     data_files: val",
             "", f"output_dir: output/{family.name}_classification",
             "per_device_train_batch_size: 32",
             "num_train_epochs: 10",
             "lr_scheduler_type: cosine",
             "warmup_steps: 0.1    # below 1: a ratio of all steps",
             "weight_decay: 0.05",
             "label_smoothing_factor: 0.1",
             "# mixup_alpha: 0.8    # timm's mixup (soft targets)",
             "# cutmix_alpha: 1.0",
             "# augment: true    # timm's training transform: random resized crop, flip, colour jitter",
             *PRECISION_LOG_SAVE,
             "# eval_strategy: epoch",
             ""]
    lines += lora_lines(family, "1.0e-04") if lora else ["learning_rate: 5.0e-05", *parts_lines(family, ())]
    return lines


def detection_starter(family, lora: bool, mixtoken: bool) -> list[str]:
    lines = ["dataset:", "  train:", "    - name: coco_detection",
             f"      data_files: {FILL_IN}    # a COCO instances JSON; or name: odvg (Grounding DINO's JSONL) "
             "or refcoco",
             "      # image_root: train2017",
             "  # eval:    # adds eval_map, eval_map_50, eval_map_75 (COCO box mAP)",
             "  #   - name: coco_detection", "  #     data_files: instances_val.json",
             "", f"output_dir: output/{family.name}_{'lora' if lora else 'detection'}",
             "per_device_train_batch_size: 4",
             "num_train_epochs: 12",
             "weight_decay: 1.0e-04",
             "max_grad_norm: 0.1",
             *PRECISION_LOG_SAVE,
             ""]
    if lora:  # Grounding DINO: adapters on the encoder / decoder linears (models/grounding_dino.py)
        return lines + lora_lines(family, "1.0e-04")
    return lines + ["learning_rate: 1.0e-04", *parts_lines(family, ("text_encoder",))]  # BERT kept as released


def text_to_audio_starter(family, lora: bool, mixtoken: bool) -> list[str]:
    lines = ["dataset:", "  train:", "    - name: audio_captions",
             f"      data_files: {FILL_IN}    # an AudioCaps-style CSV (caption + audio / file_name / audiocap_id) "
             'or a JSONL of {"audio": "a.wav", "caption": "a dog barks"}; hf_audio_captions for a datasets folder',
             "      # image_root: wav/    # the folder relative audio paths start from",
             "  # eval:    # adds eval_loss; with eval_with_do_generation also WAVs and eval_clap_similarity",
             "  #   - name: audio_captions", "  #     data_files: val.csv",
             "# eval_with_do_generation: true",
             "", f"output_dir: output/{family.name}_text_to_audio",
             "per_device_train_batch_size: 4",
             "num_train_epochs: 5",
             "lr_scheduler_type: cosine",
             "warmup_steps: 0.1    # below 1: a ratio of all steps",
             "weight_decay: 0.01",
             *PRECISION_LOG_SAVE,
             "",
             "# the UNet trains; the text encoders, VAE and vocoder stay frozen unless freeze_include says otherwise",
             "# (then it alone says what is frozen; a freeze_<part> key can only freeze a part, never train one)"]
    globs = [f"#   {part}: {list(g)}" for part, g in family.named_parts().items()]
    lines += lora_lines(family, "1.0e-04") if lora else ["learning_rate: 1.0e-05", "# the parts' globs:", *globs]
    return lines


def segmentation_starter(family, lora: bool, mixtoken: bool) -> list[str]:
    lines = ["dataset:", "  train:", "    - name: coco_segmentation",
             f"      data_files: {FILL_IN}    # a COCO instances JSON whose annotations carry a `segmentation` "
             "(polygons or RLE); one sample per non-crowd object",
             "      prompt: box    # each object prompted by its mask's box (jittered 10% in training), or: point",
             "      # image paths (file_name) are relative to the JSON's folder (or set image_root)",
             "  # eval:    # adds eval_miou (each object's mask at its image's size against its ground truth)",
             "  #   - name: coco_segmentation", "  #     data_files: val.json", "  #     prompt: box",
             "", f"output_dir: output/{family.name}_{'lora' if lora else 'segmentation'}",
             "per_device_train_batch_size: 8    # objects (each its own image pass) per step",
             "num_train_epochs: 10",
             "lr_scheduler_type: cosine",
             "warmup_steps: 0.05    # below 1: a ratio of all steps",
             "weight_decay: 0.0",
             *PRECISION_LOG_SAVE,
             "# eval_strategy: epoch",
             ""]
    if lora:  # the mask decoder trains fully beside the encoder's adapters (tasks/segmentation.py's default)
        return lines + [line if not line.startswith("# lora_modules_to_save") else
                        "# lora_modules_to_save: [mask_decoder]    # the default: trained fully beside the adapters"
                        for line in lora_lines(family, "1.0e-04")]
    return lines + ["learning_rate: 1.0e-04",
                    "# segmentation keeps the image encoder frozen by default (a pretrained SAM's); "
                    "freeze_exclude: ['vision_encoder.*'] trains it",
                    *parts_lines(family, ("vision",))]


STARTERS = {"chat": chat_starter, "contrastive": contrastive_starter, "classification": classification_starter,
            "detection": detection_starter, "text_to_audio": text_to_audio_starter,
            "segmentation": segmentation_starter}


def starter_config(family_name: str, lora: bool = False, mixtoken: bool = False) -> str:
    """The YAML text of a starter config for `family_name` (a family name or a model_type)."""
    from mixtune.models.registry import families, get_family

    family = get_family(family_name)
    build = STARTERS.get(family.task)
    if build is None:
        raise MixtuneError(f"mixtune init has no starter config for the {family.task!r} task ({family.name}) yet; "
                           "start from a config in README.md")
    if lora and not family.supports_lora:
        raise MixtuneError(f"the {family.name} family does not train LoRA adapters (mixtune list-models); drop --lora")
    if mixtoken and family.pack_positions is None:
        packing = ", ".join(f.name for f in families(task=None) if f.pack_positions is not None)
        raise MixtuneError(f"the {family.name} family cannot pack samples exactly (MixToken); drop --mixtoken. "
                           f"Families that pack: {packing}")
    what = ", ".join([family.task] + (["LoRA"] if lora else []) + (["MixToken"] if mixtoken else []))
    head = [f"# mixtune starter config: family {family.name} ({what}), written by `mixtune init`.",
            f"# Fill in the two {FILL_IN} values (the checkpoint and the data), then: mixtune train <this file>",
            "# Every key with its type, default and meaning: mixtune keys    (or: mixtune keys --search WORD)",
            "# Any key can be overridden on the command line: mixtune train cfg.yaml --learning_rate 2e-5",
            "",
            f"# a local {family.name} checkpoint folder or hub id ({what_identifies(family)});",
            f"# to try this config first on a tiny random one: mixtune make-tiny-model --family {family.name} "
            "--output_dir tiny",
            f"model_name_or_path: {FILL_IN}",
            ""]
    return "\n".join(head + build(family, lora, mixtoken)).rstrip() + "\n"


def what_identifies(family) -> str:
    if family.task == "text_to_audio":  # a diffusers pipeline folder: no config.json at its root
        return "a diffusers folder whose model_index.json names AudioLDM2Pipeline"
    return f"config.json model_type: {' or '.join(family.model_types)}"


def write_starter(text: str, path: str) -> str:
    if not path.endswith((".yaml", ".yml")):
        raise MixtuneError(f"{path}: a starter config is YAML (it carries comments); name it .yaml or .yml")
    if os.path.exists(path):
        raise MixtuneError(f"{path} exists already; choose another --output or delete it")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path
