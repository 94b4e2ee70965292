"""`mixtune demo --task dpo | grpo`: preference and RL tuning after SFT, on the demo's shapes, through `mixtune train`.

dpo:  start from the chat demo's SFT model (runs/demo/trained; `mixtune demo` is run first when it is missing),
      which answers "What colour is the shape?" with the colour word alone. Synthetic preference: a sentence
      ("The shape is red.") over the bare word. Measured on held-out images' pairs, before and after DPO:
      the preference accuracy (the DPO implicit reward, beta * (log pi - log pi_ref), ranks the chosen reply
      above the rejected; ties count half, so the untrained policy, equal to its reference, scores 0.5) and
      the model's own preference (log pi(chosen) > log pi(rejected)), and how often its generated answer is
      the chosen sentence.
grpo: start from a briefly trained SFT model (the demo's tiny model after a few SFT steps: it answers some
      questions right), reward exact match with the reference answer on the training questions; the mean
      reward per step is the curve (metrics.json "rewards", loss_curve.png), and held-out accuracy is measured
      through `mixtune predict`'s path before and after.
"""

from __future__ import annotations

import json
import logging
import os
import time

import torch

from mixtune.config import build_config
from mixtune.train.run import train

log = logging.getLogger("mixtune")

COLOUR_QUESTION = "What colour is the shape?"
DPO_TRAINING = {"per_device_train_batch_size": 8, "learning_rate": 5e-4, "max_steps": 60, "logging_steps": 5,
                "lr_scheduler_type": "constant", "weight_decay": 0.0, "save_strategy": "no", "max_length": 512,
                "seed": 0, "dataloader_num_workers": 0,
                # DPO's loss plus the SFT loss on the chosen reply (RPO). Plain sigmoid DPO at this rate also ranks
                # every held-out pair right (1.0) but wrecks generation (measured: 0 of 30 answers usable): it
                # lowers the rejected reply's likelihood faster than it raises the chosen one's
                "trl": {"beta": 0.1, "loss_type": ["sigmoid", "sft"]}}
GRPO_SFT = {"per_device_train_batch_size": 8, "learning_rate": 1e-3, "max_steps": 300, "logging_steps": 50,
            "lr_scheduler_type": "constant", "weight_decay": 0.0, "save_strategy": "no", "max_length": 512, "seed": 0}
# 4 questions a step, 8 sampled answers each (one question a step measured too noisy to show a trend)
GRPO_TRAINING = {"per_device_train_batch_size": 32, "learning_rate": 1e-3, "max_steps": 60, "logging_steps": 1,
                 "lr_scheduler_type": "constant", "weight_decay": 0.0, "save_strategy": "no", "max_length": 512,
                 "seed": 0, "reward_funcs": ["exact_match"],
                 "trl": {"num_generations": 8, "max_completion_length": 6, "temperature": 1.0}}


def sft_demo(sft_dir: str) -> str:
    """The chat demo's output folder (run first if missing)."""
    if not os.path.exists(os.path.join(sft_dir, "trained", "model.safetensors")):
        from mixtune.tools.demo import run_demo

        log.info("no SFT demo model in %s: running `mixtune demo` first", sft_dir)
        run_demo("qwen2_vl", sft_dir)
    return sft_dir


def colour_pairs(data_dir: str, split: str, out_file: str) -> int:
    """The split's colour questions as preference pairs: a sentence (chosen) over the bare word (rejected); beside
    `out_file`, the same questions with the chosen reply as the reference answer (`<out_file>.answers.json`)."""
    with open(os.path.join(data_dir, f"{split}.json")) as f:
        records = json.load(f)
    pairs = []
    for r in records:
        if "conversations" in r and r["conversations"][0][0].endswith(COLOUR_QUESTION):
            colour = r["conversations"][0][1]
            pairs.append({"messages": [{"role": "user", "content": r["conversations"][0][0]}],
                          "chosen": f"The shape is {colour}.", "rejected": colour,
                          "images": [os.path.abspath(os.path.join(data_dir, r["image"]))]})
    with open(out_file, "w") as f:
        json.dump(pairs, f)
    with open(out_file + ".answers.json", "w") as f:
        json.dump([{"messages": p["messages"] + [{"role": "assistant", "content": p["chosen"]}],
                    "images": p["images"]} for p in pairs], f)
    return len(pairs)


@torch.no_grad()
def pair_logps(model_dir: str, pairs_file: str) -> torch.Tensor:
    """(n, 2): log pi(chosen), log pi(rejected) summed over each reply's tokens, encoded as training encodes."""
    from mixtune.data.badsamples import BadSamples
    from mixtune.data.collate import PadCollator
    from mixtune.data.dataset import DatasetEntry, ImagePrep
    from mixtune.data.formats.preference import read_preference
    from mixtune.data.templates import make_renderer
    from mixtune.models.loading import load_model_and_processor
    from mixtune.models.registry import family_for_checkpoint
    from mixtune.tasks.dpo import PairCollator, PairEncoder

    family = family_for_checkpoint(model_dir)
    _, model, processor = load_model_and_processor(model_dir, None)
    model.eval()
    render = make_renderer(processor, None, family.image_placeholder, family.default_chat_template)
    encode = PairEncoder(family, processor, render, ImagePrep())
    collate = PairCollator(PadCollator(processor.tokenizer.pad_token_id, family.collate_media))
    pairs = read_preference(DatasetEntry(name="preference", data_files=pairs_file), BadSamples())
    out = []
    for i in range(0, len(pairs), 8):
        batch = collate([encode(p) for p in pairs[i:i + 8]])
        mask = batch.pop("completion_mask")[:, 1:].float()
        logits = model(**batch).logits[:, :-1].float()
        token_logps = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        summed = (token_logps * mask).sum(-1)
        out.append(torch.stack(summed.chunk(2), dim=1))
    return torch.cat(out)


def preference_accuracy(policy: torch.Tensor, reference: torch.Tensor) -> float:
    margin = (policy[:, 0] - policy[:, 1]) - (reference[:, 0] - reference[:, 1])
    return float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())


def run_dpo_demo(output_dir: str, sft_dir: str, overrides: dict) -> dict:
    start = time.time()
    data_dir = os.path.join(sft_demo(sft_dir), "data")
    model_dir = os.path.join(sft_dir, "trained")
    os.makedirs(output_dir, exist_ok=True)
    train_file, val_file = os.path.join(output_dir, "train_pairs.json"), os.path.join(output_dir, "val_pairs.json")
    n_train, n_val = colour_pairs(data_dir, "train", train_file), colour_pairs(data_dir, "val", val_file)
    from mixtune.tools.demo import answer_accuracy

    reference = pair_logps(model_dir, val_file)
    sentences_before, _ = answer_accuracy(model_dir, val_file + ".answers.json",
                                          output_dir=os.path.join(output_dir, "predictions_before"))
    trained = os.path.join(output_dir, "trained")
    raw = {"model_name_or_path": model_dir, "task": "dpo", "output_dir": trained, "overwrite_output_dir": True,
           "dataset": {"train": [{"name": "preference", "data_files": train_file}],
                       "eval": [{"name": "preference", "data_files": val_file}]},
           **DPO_TRAINING, **overrides}
    t = time.time()
    final = train(build_config(raw))
    train_s = time.time() - t
    policy = pair_logps(trained, val_file)
    sentences_after, examples = answer_accuracy(trained, val_file + ".answers.json",
                                                output_dir=os.path.join(output_dir, "predictions"))
    report = {
        "task": "dpo", "sft_model": model_dir, "train_pairs": n_train, "held_out_pairs": n_val,
        "preference": "chosen 'The shape is <colour>.' over rejected '<colour>'",
        "preference_accuracy_before": preference_accuracy(reference, reference),
        "preference_accuracy_after": preference_accuracy(policy, reference),
        "own_preference_before": float((reference[:, 0] > reference[:, 1]).float().mean()),
        "own_preference_after": float((policy[:, 0] > policy[:, 1]).float().mean()),
        "answers_as_the_chosen_sentence_before": sentences_before,  # generated, exact match
        "answers_as_the_chosen_sentence_after": sentences_after,
        "eval_rewards_margins": final.get("eval_rewards/margins"),
        "eval_rewards_accuracies_trl": final.get("eval_rewards/accuracies"),
        "train_runtime_s": round(train_s, 1), "total_runtime_s": round(time.time() - start, 1),
        "model_dir": trained, "examples": examples[:4],
    }
    with open(os.path.join(output_dir, "demo_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def run_grpo_demo(output_dir: str, sft_dir: str, overrides: dict) -> dict:
    from mixtune.tools.demo import answer_accuracy

    start = time.time()
    data_dir = os.path.join(sft_demo(sft_dir), "data")
    train_file, val_file = os.path.join(data_dir, "train.json"), os.path.join(data_dir, "val.json")
    brief_sft = os.path.join(output_dir, "brief_sft")
    base = {"overwrite_output_dir": True, "dataset": {"train": [{"name": "chatml_dataset", "data_files": train_file}]}}
    train(build_config({**base, **GRPO_SFT, "model_name_or_path": os.path.join(sft_dir, "tiny_model"),
                        "output_dir": brief_sft}))
    # the colour questions: a checkable answer (captions have none) that a few dozen steps can move
    questions = os.path.join(output_dir, "train_questions.json")
    val_colour = os.path.join(output_dir, "val_colour.json")
    for source, target in ((train_file, questions), (val_file, val_colour)):
        with open(source) as f, open(target, "w") as out:
            json.dump([dict(r, image=os.path.abspath(os.path.join(data_dir, r["image"]))) for r in json.load(f)
                       if "conversations" in r and r["conversations"][0][0].endswith(COLOUR_QUESTION)], out)
    held_out = (("colour", val_colour), ("all", val_file))
    before = {name: answer_accuracy(brief_sft, path, output_dir=os.path.join(output_dir, f"before_{name}"))[0]
              for name, path in held_out}
    trained = os.path.join(output_dir, "trained")
    t = time.time()
    entry = {"name": "chatml_dataset", "data_files": questions}
    train(build_config({**base, **GRPO_TRAINING, "model_name_or_path": brief_sft, "task": "grpo",
                        "output_dir": trained, "dataset": {"train": [entry]}, **overrides}))
    train_s = time.time() - t
    after = {name: answer_accuracy(trained, path, output_dir=os.path.join(output_dir, f"after_{name}"))[0]
             for name, path in held_out}
    with open(os.path.join(trained, "metrics.json")) as f:
        curve = json.load(f)["rewards"]["reward"]
    rewards = [r for _, r in curve]
    k = max(1, len(rewards) // 6)
    report = {
        "task": "grpo", "start_model": brief_sft, "reward": "exact_match against the reference answer",
        "mean_reward_first_steps": sum(rewards[:k]) / k, "mean_reward_last_steps": sum(rewards[-k:]) / k,
        "steps_averaged": k,
        "held_out_colour_accuracy_before": before["colour"], "held_out_colour_accuracy_after": after["colour"],
        # GRPO trained on colour questions only: the other kinds are not rewarded and may drift
        "held_out_all_questions_accuracy_before": before["all"], "held_out_all_questions_accuracy_after": after["all"],
        "reward_curve": curve, "train_runtime_s": round(train_s, 1), "total_runtime_s": round(time.time() - start, 1),
        "model_dir": trained, "loss_curve": os.path.join(trained, "loss_curve.png"),
    }
    with open(os.path.join(output_dir, "demo_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def run_pref_demo(task: str, output_dir: str, overrides: dict, sft_dir: str = "runs/demo") -> dict:
    torch.set_num_threads(1)  # tiny matrices: one thread is faster and steady on a loaded machine
    if output_dir == "runs/demo":  # the CLI's default belongs to the chat demo it starts from
        output_dir = f"runs/demo_{task}"
    return (run_dpo_demo if task == "dpo" else run_grpo_demo)(output_dir, sft_dir, overrides)
