"""task: kto through TRL's KTOTrainer on tiny Qwen2-VL checkpoints: unpaired data, KL rows, reference, LoRA."""

from __future__ import annotations

import json

import pytest
import torch

from mixtune.config import build_config
from mixtune.errors import ConfigError

pytest.importorskip("trl")

COLOURS = {"red": (220, 30, 30), "blue": (40, 60, 220)}
QUESTION = "<image>What colour is it?"


def kto_config(model_dir, data, out, **extra) -> dict:
    return {"model_name_or_path": model_dir, "task": "kto", "output_dir": str(out), "overwrite_output_dir": True,
            "dataset": {"train": [{"name": "unpaired", "data_files": data}]}, "per_device_train_batch_size": 4,
            "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True,
            "max_length": 256, "seed": 0, **extra}


@pytest.fixture(scope="module")
def colour_replies(tmp_path_factory):
    """Two one-colour images; desirable: the colour word alone, undesirable: a sentence (LLaMA-Factory's
    kto_tag shape: the reply is the last turn)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("kto")
    records = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        Image.new("RGB", (56, 56), rgb).save(root / f"{i}.png")
        for reply, label in ((name, True), (f"The colour of it is {name}.", False)):
            turns = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": reply}]
            records.append({"messages": turns, "label": label, "images": [f"{i}.png"]})
    (root / "kto.json").write_text(json.dumps(records))
    pairs = [{"prompt": QUESTION, "chosen": name, "rejected": f"The colour of it is {name}.", "images": [f"{i}.png"]}
             for i, name in enumerate(COLOURS)]
    (root / "pairs.json").write_text(json.dumps(pairs))
    return root


def test_kto_raises_the_desirable_over_undesirable_margin(tiny_model_dir, colour_replies, tmp_path):
    from mixtune.train.run import train

    out = tmp_path / "out"
    train(build_config(kto_config(tiny_model_dir("qwen2_vl"), str(colour_replies / "kto.json"), out, max_steps=4)))
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    margins = [h["rewards/margins"] for h in history if "rewards/margins" in h]
    assert len(margins) == 4
    assert margins[0] == 0.0  # step 1: the policy is the reference
    assert min(margins[1:]) > 0.1
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s for s, _ in metrics["rewards"]["rewards/margins"]] == [1, 2, 3, 4]  # plotted beside the loss
    assert (out / "loss_curve.png").exists() and (out / "model.safetensors").exists()


def test_kto_with_lora_trains_only_the_adapters(tiny_model_dir, colour_replies, tmp_path):
    from mixtune.train.run import build_trainer

    config = build_config(kto_config(tiny_model_dir("qwen2_vl"), str(colour_replies / "kto.json"), tmp_path / "o",
                                     max_steps=2, lora=True))
    trainer = build_trainer(config)
    model = trainer.model
    assert list(model.peft_config) == ["default"] and trainer.ref_model is None  # the disabled adapter
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert max(h.get("rewards/margins", 0) for h in trainer.state.log_history) > 0


def test_kl_rows_are_each_prompt_with_the_previous_rows_reply(tiny_model_dir, colour_replies, tmp_path):
    """TRL's layout: KL row i = row i's prompt (its image tokens, its pixels) + row i-1's reply, cycled."""
    from mixtune.train.run import build_trainer

    trainer = build_trainer(build_config(kto_config(tiny_model_dir("qwen2_vl"), str(colour_replies / "kto.json"),
                                                    tmp_path / "o", max_steps=1)))
    assert trainer.args.train_sampling_strategy == "random"  # the user's sampling, not TRL's forced sequential
    data = trainer.train_dataset
    rows = [data[i] for i in range(4)]
    batch = trainer.data_collator(rows)
    tok = trainer.processing_class.tokenizer

    def text(ids, mask):
        return tok.decode(ids[mask.bool()])
    for i in range(4):
        j = i - 1
        e_i, e_j = rows[i]["encoded"], rows[j]["encoded"]
        start_i, start_j = (int((e.labels != -100).nonzero()[0]) for e in (e_i, e_j))
        # the prompt up to where its reply starts; the other row's reply and what follows it (end of turn)
        expected = tok.decode(e_i.input_ids[:start_i]) + tok.decode(e_j.input_ids[start_j:])
        assert text(batch["KL_input_ids"][i], batch["KL_attention_mask"][i]) == expected
        reply_j = tok.decode(e_j.input_ids[e_j.labels != -100])
        assert text(batch["KL_input_ids"][i], batch["KL_completion_mask"][i]) == reply_j
    assert batch["label"].tolist() == [r["label"] for r in rows]
    assert batch["pixel_values"].shape[0] == batch["image_grid_thw"].prod(-1).sum()  # one set of images for both


def write_records(path, records) -> str:
    path.write_text("\n".join(json.dumps(r) for r in records))
    return str(path)


def test_unpaired_shapes_and_split_pairs_read_alike(tmp_path):
    from mixtune.data.badsamples import BadSamples
    from mixtune.data.dataset import DatasetEntry
    from mixtune.data.formats.unpaired import read_unpaired

    (tmp_path / "a.png").write_bytes(b"")
    user = {"role": "user", "content": "<image>Q?"}
    records = [
        {"conversations": [{"from": "human", "value": "<image>Q?"}, {"from": "gpt", "value": "yes"}],
         "kto_tag": True, "images": ["a.png"]},  # LLaMA-Factory (kto_tag)
        {"messages": [user, {"role": "assistant", "content": "no"}], "label": False, "images": ["a.png"]},  # ms-swift
        {"prompt": [user], "completion": [{"role": "assistant", "content": "yes"}], "label": True,
         "images": ["a.png"]},  # TRL's unpaired
        {"prompt": [user], "chosen": "yes", "rejected": "no", "images": ["a.png"]},  # a pair: two samples
    ]
    entry = DatasetEntry(name="unpaired", data_files=write_records(tmp_path / "u.jsonl", records))
    samples = read_unpaired(entry, BadSamples())
    assert [(s.prompt.turns[-1].text, s.completion, s.label, len(s.prompt.images)) for s in samples] == [
        ("<image>Q?", "yes", True, 1), ("<image>Q?", "no", False, 1), ("<image>Q?", "yes", True, 1),
        ("<image>Q?", "yes", True, 1), ("<image>Q?", "no", False, 1)]
    assert [t.role for t in samples[0].conversation().turns] == ["user", "assistant"]


@pytest.mark.parametrize("record, field, reason", [
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}]}, "label",
     "missing the label"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}], "label": "yes"},
     "label", "must be true or false"),
    ({"messages": [{"role": "user", "content": "Q"}], "label": True}, "completion", "missing the reply"),
    ({"prompt": "Q", "completion": " ", "label": True}, "completion", "empty"),
    ({"prompt": "Q", "chosen": "a", "rejected": "b", "label": True}, "label", "not both"),
    ({"prompt": "Q", "chosen": "a", "rejected": "a"}, "rejected", "identical"),
    ({"prompt": "<image><image>Q", "completion": "a", "label": True, "images": ["x.png"]}, "image",
     "2 '<image>' placeholder"),
])
def test_bad_records_name_file_index_and_field_or_are_counted(tmp_path, record, field, reason):
    from badrecords import assert_named_or_counted
    from mixtune.data.dataset import DatasetEntry
    from mixtune.data.formats.unpaired import read_unpaired

    (tmp_path / "x.png").write_bytes(b"")
    good = {"prompt": "Q", "completion": "a", "label": False}
    entry = DatasetEntry(name="kto", data_files=write_records(tmp_path / "u.jsonl", [good, record, good]))
    assert_named_or_counted(read_unpaired, entry, field, reason)


def test_kto_config_refusals(tiny_model_dir, colour_replies, tmp_path):
    from mixtune.train.run import build_trainer

    def build(**extra):
        return build_trainer(build_config(kto_config(tiny_model_dir("qwen2_vl"), str(colour_replies / "kto.json"),
                                                     tmp_path / "o", max_steps=1, **extra)))
    with pytest.raises(ConfigError, match="KTOTrainer has kto, apo_zero_unpaired") as e:
        build(trl={"loss_type": "sigmoid"})
    assert e.value.key == "trl.loss_type"
    with pytest.raises(ConfigError, match="KL term") as e:
        build(per_device_train_batch_size=1)
    assert e.value.key == "per_device_train_batch_size"
    with pytest.raises(ConfigError, match="is read only by task dpo, kto, grpo") as e:
        build(task="chat", trl={"beta": 0.2})
    trainer = build(trl={"beta": 0.25, "desirable_weight": 2.0}, dataset={
        "train": [{"name": "preference", "data_files": str(colour_replies / "pairs.json")}]})
    assert (trainer.beta, trainer.desirable_weight, trainer.args.learning_rate) == (0.25, 2.0, 1e-3)
    assert len(trainer.train_dataset) == 4  # two pairs read by the preference reader, split in two each
    assert sorted(trainer.train_dataset[i]["label"] for i in range(4)) == [False, False, True, True]
