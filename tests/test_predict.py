"""`mixtune predict`: metrics against hand-computed values, batched generation equal to one-at-a-time greedy
generation, references grouped per prompt, LoRA adapters answered as their merged model."""

from __future__ import annotations

import json
import math
import os

import pytest
from PIL import Image

from mixtune.cli import main
from mixtune.data.conversation import Conversation, Turn
from mixtune.infer.engine import Engine, GenerationOptions
from mixtune.infer.metrics import caption_scores, exact_match, normalize_vqa_answer, score, vqa_accuracy
from mixtune.infer.predict import read_prompts
from mixtune.data.dataset import DatasetEntry

from conftest import write_json


@pytest.mark.parametrize("raw,normalised", [
    ("Two", "2"), ("the dog.", "dog"), ("A red, round ball!", "red round ball"), ("dont", "don't"),
    ("yes\n", "yes"), ("1,000", "1000"), ("3.5", "3.5"), ("an apple", "apple"), ("left-hand", "left hand"),
])
def test_vqa_normalisation(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


def test_vqa_accuracy_counts_human_answers():
    ten = ["2", "two", "2", "3", "3", "3", "3", "4", "4", "4"]
    assert vqa_accuracy("Two", ten) == pytest.approx(1.0)  # 3 humans said 2 (one as "two")
    assert vqa_accuracy("4", ten) == pytest.approx(1.0)
    assert vqa_accuracy("3", ["3", "3", "4", "5", "5", "5", "5", "5", "5", "5"]) == pytest.approx(2 / 3)
    assert vqa_accuracy("7", ten) == 0.0
    assert vqa_accuracy("the cat", ["cat"]) == 1.0  # one reference: normalised exact match
    assert vqa_accuracy("cat", ["cat", "dog"]) == pytest.approx(0.5)


def test_exact_match():
    assert exact_match(" red ", ["red"]) == 1.0
    assert exact_match("Red", ["red"]) == 0.0
    assert exact_match("b", ["a", "b"]) == 1.0


def test_caption_scores_hand_computed():
    # BLEU-4: clipped n-gram precisions 5/6, 3/5, 2/4, 1/3 and equal lengths (no brevity penalty);
    # ROUGE-L: LCS 5 of 6 tokens each way, so P = R = F = 5/6
    s = caption_scores(["The cat sat on the mat."], [["the cat sat on a mat"]])
    assert s["bleu4"] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-6)
    assert s["rouge_l"] == pytest.approx(5 / 6, abs=1e-9)
    # CIDEr-D: a prediction equal to its only reference scores 10 (cosine 1 for each n, no length penalty,
    # times 10); one sharing no n-gram with its reference scores 0: the corpus mean is 5
    s = caption_scores(["a red square on grass", "blue sky"], [["a red square on grass"], ["green field today"]])
    assert s["cider"] == pytest.approx(5.0, abs=1e-6)


def test_score_skips_samples_without_references():
    out = score(["red", "blue", "x"], [["red"], ["green"], []], metrics=("exact_match", "vqa_accuracy"))
    assert out == {"exact_match": 0.5, "vqa_accuracy": 0.5, "samples": 2}


def images(n):
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    return [[Image.new("RGB", (40 + 16 * i, 90 - 10 * i), colours[i % 4])] for i in range(n)]


QUESTIONS = ["<image>What colour is it?", "<image>Describe the shape in the middle of the picture in a few words",
             "<image>Hi", "<image>Is it on the left or on the right side?"]


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next", "mllama", "instructblip", "paligemma"])
def test_batched_equals_one_at_a_time(tiny_model_dir, family):
    """Left padding changes nothing: a batch of prompts of different lengths and image sizes gets the same
    greedy tokens as each prompt alone (all 15 families were checked once by hand; these five cover token
    type ids, padded pixel tiles, cross-attention masks and Q-Former inputs)."""
    engine = Engine.load(tiny_model_dir(family))
    convs = [Conversation(turns=[Turn("user", q)], images=["mem"]) for q in QUESTIONS]
    opts = GenerationOptions(max_new_tokens=6)
    batched = engine.answer(convs, images(4), opts)
    alone = [engine.answer([c], [i], opts)[0] for c, i in zip(convs, images(4))]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert all(len(g.token_ids) > 0 for g in batched)
    assert [g.text for g in batched] == [g.text for g in alone]


def test_references_grouped_per_prompt(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "b.png")
    data = write_json(tmp_path / "caps.json", [{"image": "a.png", "caption": ["A cat.", "A small cat."]},
                                                {"image": "b.png", "caption": "A dog."}])
    items = read_prompts([DatasetEntry(name="coco_caption", data_files=data)])
    assert [it.references for it in items] == [["A cat.", "A small cat."], ["A dog."]]
    assert [[s[1] for s in it.sources] for it in items] == [[0, 0], [1]]
    vqa = write_json(tmp_path / "vqa.json", [{"image": "a.png", "question": "How many?",
                                              "answers": ["2", "2", "two", "3"]}])
    (item,) = read_prompts([DatasetEntry(name="vqa", data_files=vqa)])  # every human answer counts
    assert item.references == ["2", "2", "two", "3"] and item.conv.turns[-1].role == "user"


def test_grounding_samples_are_refused_not_asked_with_literal_placeholders(tmp_path):
    from mixtune.errors import DataError

    Image.new("RGB", (40, 20)).save(tmp_path / "a.png")
    record = {"image": "a.png", "objects": {"ref": ["cat"], "bbox": [[1, 2, 30, 18]]},
              "messages": [{"role": "user", "content": "<image>Where is <ref-object>?"},
                           {"role": "assistant", "content": "<bbox>"}]}
    data = write_json(tmp_path / "g.json", [record, {**record, "objects": None}])
    with pytest.raises(DataError, match="g.json.*sample 0.*'objects'.*filled in by training only"):
        read_prompts([DatasetEntry(name="chatml_dataset", data_files=data)])
    skipped = read_prompts([DatasetEntry(name="chatml_dataset", data_files=data, on_bad_sample="skip")])
    assert skipped == []  # the second record has placeholders and no objects: a bad sample in the reader too


def test_predict_cli_writes_predictions_and_metrics(tiny_model_dir, demo_data_dir, tmp_path, capsys):
    model = tiny_model_dir("qwen2_vl")
    val = os.path.join(demo_data_dir, "val.json")
    out1, out4 = tmp_path / "b1", tmp_path / "b4"
    base = ["predict", "--model", model, "--data_files", val, "--max_new_tokens", "5"]
    assert main(base + ["--output_dir", str(out1), "--batch_size", "1"]) == 0
    assert main(base + ["--output_dir", str(out4), "--batch_size", "5"]) == 0
    rows1 = [json.loads(line) for line in open(out1 / "predictions.jsonl")]
    rows4 = [json.loads(line) for line in open(out4 / "predictions.jsonl")]
    with open(val) as f:
        samples = json.load(f)
    assert len(rows1) == len(samples)
    assert [r["prediction"] for r in rows1] == [r["prediction"] for r in rows4]
    assert [r["reference"] for r in rows1] == [s["conversations"][-1][1] for s in samples]
    assert [r["index"] for r in rows1] == list(range(len(samples)))
    assert rows1[0]["prompt"].endswith("<|im_start|>assistant\n") and rows1[0]["file"] == val
    metrics = json.load(open(out4 / "metrics.json"))
    expected = score([r["prediction"] for r in rows4], [r["references"] for r in rows4])
    assert metrics == pytest.approx(expected)
    assert metrics["samples"] == len(samples)


def test_predict_on_a_config_eval_split_with_its_lora_adapter(tiny_model_dir, demo_data_dir, tmp_path):
    """A config's eval split and the LoRA adapter its run saved: answers equal the merged model's."""
    import torch
    from peft import LoraConfig, get_peft_model

    from mixtune.models.loading import load_model_and_processor
    from mixtune.tools.merge_lora import merge_lora

    base = tiny_model_dir("qwen2_vl")
    _, model, processor = load_model_and_processor(base)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                                                  init_lora_weights=False))
    run = tmp_path / "run"
    peft_model.save_pretrained(run)
    processor.save_pretrained(run)
    merged = merge_lora(str(run), str(tmp_path / "merged"), base)
    val = os.path.join(demo_data_dir, "val.json")
    config = write_json(tmp_path / "cfg.json", {"model_name_or_path": base, "output_dir": str(run),
                                                "dataset": {"train": [], "eval": [
                                                    {"name": "chatml_dataset", "data_files": val,
                                                     "max_samples": 6}]}})
    assert main(["predict", "--config", config, "--output_dir", str(tmp_path / "a"), "--max_new_tokens", "5"]) == 0
    assert main(["predict", "--model", merged, "--data_files", val, "--output_dir", str(tmp_path / "m"),
                 "--max_new_tokens", "5"]) == 0
    adapter_rows = [json.loads(line) for line in open(tmp_path / "a" / "predictions.jsonl")]
    merged_rows = [json.loads(line) for line in open(tmp_path / "m" / "predictions.jsonl")][:6]
    assert len(adapter_rows) == 6
    assert [r["prediction"] for r in adapter_rows] == [r["prediction"] for r in merged_rows]
    plain = Engine.load(base).answer([Conversation(turns=[Turn("user", QUESTIONS[0])], images=["m"])], images(1),
                                     GenerationOptions(max_new_tokens=5))
    adapted = Engine.load(base, str(run)).answer([Conversation(turns=[Turn("user", QUESTIONS[0])], images=["m"])],
                                                images(1), GenerationOptions(max_new_tokens=5))
    assert plain[0].token_ids != adapted[0].token_ids  # the adapter is really applied


def test_predict_refuses_two_datasets(tmp_path, capsys):
    assert main(["predict", "--model", "x", "--data_files", "a.json", "--config", "c.json"]) == 2
    assert "exactly one of" in capsys.readouterr().err


def test_generation_options_are_checked(capsys):
    assert main(["predict", "--model", "x", "--data_files", "a.json", "--max_new_tokens", "0"]) == 2
    assert "max_new_tokens" in capsys.readouterr().err
    assert math.isclose(GenerationOptions(temperature=0.5).check().temperature, 0.5)


def test_predict_uses_the_given_chat_template(tiny_model_dir, demo_data_dir, tmp_path):
    """A PaddleMIX chat_template.json renders predict's prompts, as it renders training samples."""
    template = write_json(tmp_path / "chat_template.json", {"system": "SYS ", "conversation": ["U: {{user}} A:",
                                                                                             " {{bot}}"],
                                                            "query": "Q: {{query}} A:"})
    val = os.path.join(demo_data_dir, "val.json")
    out = tmp_path / "p"
    assert main(["predict", "--model", tiny_model_dir("qwen2_vl"), "--chat_template", template, "--dataset",
                 json.dumps({"name": "chatml_dataset", "data_files": val, "max_samples": 2}),
                 "--output_dir", str(out), "--max_new_tokens", "2"]) == 0
    rows = [json.loads(line) for line in open(out / "predictions.jsonl")]
    with open(val) as f:
        question = json.load(f)[0]["conversations"][0][0]
    markup = "<|vision_start|><|image_pad|><|vision_end|>"
    assert rows[0]["prompt"] == "SYS Q: " + question.replace("<image>", markup) + " A:"
