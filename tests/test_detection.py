"""The detection task on a tiny Grounding DINO: readers (COCO, ODVG, RefCOCO) and their bad records, the
phrase-to-class decoding, COCO mAP on the fixture (perfect 1.0, empty 0.0), training through `mixtune train`'s
path (loss falls, reload equal), `mixtune predict --draw`, and ONNX export equal to torch."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_config
from mixtune.data.badsamples import BadSamples
from mixtune.data.dataset import DatasetEntry
from mixtune.data.formats import get_reader
from mixtune.errors import DataError
from mixtune.infer.coco_eval import box_map, coco_ground_truth
from mixtune.tasks.detection import DetectionPrep, coco_records, decode_detections
from mixtune.tools.detection_demo import CATEGORIES, make_detection_data


@pytest.fixture(scope="session")
def gd_dir(tmp_path_factory):
    from mixtune.models.grounding_dino import build_tiny

    return build_tiny(str(tmp_path_factory.mktemp("gd") / "tiny"))


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return make_detection_data(str(root), 16, "train"), make_detection_data(str(root), 6, "val")


def entry(tmp_path, name, data_files, **keys):
    return DatasetEntry.from_config({"name": name, "data_files": data_files, **keys}, str(tmp_path), "test")


def read(tmp_path, name, data_files, policy="error", **keys):
    bad = BadSamples(policy)
    return get_reader(name)(entry(tmp_path, name, data_files, on_bad_sample=policy, **keys), bad), bad


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


# ---- readers ------------------------------------------------------------------------------------------------

def test_coco_detection_prompts_every_category_in_file_order(tmp_path, shapes):
    samples, _ = read(tmp_path, "coco_detection", shapes[1])
    coco = json.load(open(shapes[1]))
    assert len(samples) == len(coco["images"]) == 6
    s = samples[0]
    assert s.prompt == "red circle . blue square . green triangle . yellow circle ."
    anns = [a for a in coco["annotations"] if a["image_id"] == coco["images"][0]["id"]]
    assert s.boxes == [tuple(float(v) for v in a["bbox"]) for a in anns]
    assert s.labels == [a["category_id"] - 1 for a in anns]  # ids 1..4 in the file's order
    assert (s.image_id, s.category_ids) == (1, (1, 2, 3, 4))


def test_odvg_detection_and_grounding_records(tmp_path):
    Image.new("RGB", (50, 40)).save(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "odvg.jsonl", [
        {"filename": "a.png", "height": 40, "width": 50, "detection": {"instances": [
            {"bbox": [10, 5, 30, 25], "label": 2, "category": "Cat"}, {"bbox": [0, 0, 5, 5], "label": 0,
                                                                       "category": "dog"}]}},
        {"filename": "a.png", "grounding": {"caption": "a red ball next to a box", "regions": [
            {"bbox": [1, 2, 11, 12], "phrase": "a red ball", "tokens_positive": [[0, 10]]},
            {"bbox": [20, 2, 40, 12], "phrase": "a box", "tokens_positive": [[19, 24]]},
            {"bbox": [2, 3, 12, 13], "phrase": "a red ball", "tokens_positive": [[0, 10]]}]}}])
    (det, ground), _ = read(tmp_path, "odvg", path)
    assert det.phrases == ("dog", "cat") and det.labels == [1, 0]  # every label of the entry, by label order
    assert det.boxes == [(10, 5, 20, 20), (0, 0, 5, 5)]  # x1 y1 x2 y2 -> x y w h
    assert ground.phrases == ("a red ball", "a box") and ground.labels == [0, 1, 0]
    assert (ground.width, ground.height) == (50, 40)  # read from the image when the record has no size


def test_refcoco_one_sample_per_expression(tmp_path):
    Image.new("RGB", (60, 30)).save(tmp_path / "r.png")
    path = write_jsonl(tmp_path / "ref.jsonl", [
        {"image": "r.png", "bbox": [5, 5, 10, 10], "sentences": ["the red circle.", {"sent": "Left thing?"}]},
        {"image": "r.png", "bbox": [30, 0, 30, 30], "expression": "right square"}])
    samples, _ = read(tmp_path, "refcoco", path)
    assert [s.prompt for s in samples] == ["the red circle .", "left thing .", "right square ."]
    assert [s.boxes for s in samples] == [[(5, 5, 10, 10)]] * 2 + [[(30, 0, 30, 30)]]
    assert all(s.labels == [0] for s in samples)


BAD_ODVG = [
    ({"filename": "a.png", "detection": {"instances": [{"bbox": [10, 5, 60, 25], "label": 0, "category": "x"}]}},
     "detection.instances[0].bbox", "outside"),
    ({"filename": "a.png", "detection": {"instances": [{"bbox": [10, 5, 5, 25], "label": 0, "category": "x"}]}},
     "detection.instances[0].bbox", "non-positive"),
    ({"filename": "a.png", "detection": {"instances": [{"bbox": [1, 1, 5, 5], "label": -1, "category": "x"}]}},
     "detection.instances[0].label", "non-negative"),
    ({"filename": "a.png", "grounding": {"regions": [{"bbox": [1, 1, 5, 5], "phrase": " "}]}},
     "grounding.regions[0].phrase", "phrase"),
    ({"filename": "missing.png", "detection": {"instances": []}}, "filename", "not found"),
]


@pytest.mark.parametrize("record,field,reason", BAD_ODVG)
def test_bad_odvg_record_names_file_line_and_field(tmp_path, record, field, reason):
    Image.new("RGB", (50, 40)).save(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "odvg.jsonl", [{"filename": "a.png", "detection": {"instances": []}}, record])
    with pytest.raises(DataError) as e:
        read(tmp_path, "odvg", path)
    assert (e.value.file, e.value.line, e.value.field) == (path, 2, field) and reason in e.value.reason


def test_bad_records_skipped_and_counted(tmp_path):
    Image.new("RGB", (50, 40)).save(tmp_path / "a.png")
    good = {"filename": "a.png", "detection": {"instances": [{"bbox": [1, 1, 5, 5], "label": 0, "category": "x"}]}}
    path = write_jsonl(tmp_path / "odvg.jsonl", [good] + [r for r, _, _ in BAD_ODVG] + [good])
    samples, bad = read(tmp_path, "odvg", path, policy="skip")
    assert len(samples) == 2 and len(bad.records) == len(BAD_ODVG)
    assert [r["line"] for r in bad.records] == list(range(2, 2 + len(BAD_ODVG)))


def test_image_whose_size_disagrees_with_its_record_is_refused(tmp_path):
    Image.new("RGB", (50, 40)).save(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "odvg.jsonl", [
        {"filename": "a.png", "width": 100, "height": 80, "detection": {"instances": []}}])
    (sample,), _ = read(tmp_path, "odvg", path)
    with pytest.raises(DataError, match="50x40 but its record says 100x80") as e:
        DetectionPrep()(sample)
    assert (e.value.file, e.value.index, e.value.field) == (path, 0, "image")


# ---- decoding and COCO mAP ----------------------------------------------------------------------------------

def test_decode_scores_each_phrase_by_its_own_tokens(gd_dir):
    from transformers import AutoProcessor

    ids = AutoProcessor.from_pretrained(gd_dir).tokenizer(["red circle . blue square ."], return_tensors="pt")
    ids = ids["input_ids"]  # [CLS] red circle . blue square . [SEP]
    logits = torch.full((1, 3, 64), -30.0)
    logits[0, 0, 4:6] = 4.0  # query 0: "blue square" -> phrase 1
    logits[0, 2, 1] = 2.0  # query 2: "red" but not "circle" -> half of phrase 0
    logits[0, 1, 2] = 3.0  # query 1: "circle" alone: half of phrase 0, above query 2
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.75, 0.5, 0.5]]])
    (xywh, phrases, scores), = decode_detections(logits, boxes, ids, [(100, 50)], top_k=2)
    sigmoid = lambda v: torch.sigmoid(torch.tensor(v)).item()  # noqa: E731
    assert phrases == [1, 0]
    assert scores == pytest.approx([sigmoid(4.0), sigmoid(3.0) / 2], abs=1e-6)  # a phrase scores its tokens' mean
    assert xywh[0] == pytest.approx([40.0, 15.0, 20.0, 20.0]) and xywh[1] == pytest.approx([5.0, 2.5, 10.0, 5.0])


def fixture_samples(tmp_path, shapes):
    samples, _ = read(tmp_path, "coco_detection", shapes[1])
    return samples


def test_map_of_perfect_predictions_is_one_and_of_none_zero(tmp_path, shapes):
    samples = fixture_samples(tmp_path, shapes)
    perfect = [([list(b) for b in s.boxes], list(s.labels), [1.0] * len(s.boxes)) for s in samples]
    images, anns, results, cats = coco_records(samples, perfect)
    assert len(anns) == len(results) == sum(len(s.boxes) for s in samples) > 6
    assert [c["name"] for c in cats] == [f"{c} {s}" for c, s in CATEGORIES][: len(cats)] or len(cats) <= 4
    gt = coco_ground_truth(images, anns, cats)
    assert box_map(gt, results) == {"map": 1.0, "map_50": 1.0, "map_75": 1.0}
    assert box_map(gt, []) == {"map": 0.0, "map_50": 0.0, "map_75": 0.0}
    wrong_class = [(b, [(lab + 1) % 4 for lab in labels], sc) for b, labels, sc in perfect]
    assert box_map(gt, coco_records(samples, wrong_class)[2])["map"] == 0.0
    shifted = [([[x + w * 0.4, y, w, h] for x, y, w, h in b], labels, sc) for b, labels, sc in perfect]  # IoU 0.43
    assert box_map(gt, coco_records(samples, shifted)[2]) == {"map": 0.0, "map_50": 0.0, "map_75": 0.0}
    nudged = [([[x + w * 0.1, y, w, h] for x, y, w, h in b], labels, sc) for b, labels, sc in perfect]  # IoU 0.82
    scores = box_map(gt, coco_records(samples, nudged)[2])
    assert scores["map_50"] == 1.0 and scores["map_75"] == 1.0 and 0.3 < scores["map"] < 0.9


def test_results_keep_the_coco_files_own_ids(tmp_path, shapes):
    samples = fixture_samples(tmp_path, shapes)
    dets = [([list(b) for b in s.boxes], list(s.labels), [0.9] * len(s.boxes)) for s in samples]
    images, _, results, _ = coco_records(samples, dets)
    coco = json.load(open(shapes[1]))
    assert [i["id"] for i in images] == [i["id"] for i in coco["images"]]
    assert sorted((r["image_id"], r["category_id"], tuple(r["bbox"])) for r in results) == sorted(
        (a["image_id"], a["category_id"], tuple(float(v) for v in a["bbox"])) for a in coco["annotations"])


# ---- training, reload, predict ------------------------------------------------------------------------------

def detection_config(tmp_path, gd_dir, shapes, **overrides):
    from mixtune.config import load_config

    keys = dict(per_device_train_batch_size=4, per_device_eval_batch_size=6, learning_rate=1e-3, max_steps=12,
                logging_steps=1, save_strategy="no", max_grad_norm=0.1)
    path = write_config(tmp_path, gd_dir, shapes[0], dataset={
        "train": [{"name": "coco_detection", "data_files": shapes[0]}],
        "eval": [{"name": "coco_detection", "data_files": shapes[1]}]}, **{**keys, **overrides})
    return load_config(path)


def test_loss_falls_and_the_saved_model_reloads_equal(tmp_path, gd_dir, shapes):
    from transformers import GroundingDinoForObjectDetection

    from mixtune.train.run import build_trainer

    config = detection_config(tmp_path, gd_dir, shapes)
    trainer = build_trainer(config)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_map", "eval_map_50", "eval_map_75"} <= set(metrics)
    out = str(tmp_path / "saved")
    trainer.save_final(out)
    reloaded = GroundingDinoForObjectDetection.from_pretrained(out).eval()
    model = trainer.model.eval()
    batch = trainer.data_collator.inputs([trainer.eval_dataset[i] for i in range(3)], with_labels=False)
    with torch.no_grad():
        a, b = model(**batch), reloaded(**batch)
    assert torch.equal(a.pred_boxes, b.pred_boxes) and torch.equal(a.logits, b.logits)


def test_lora_trains_adapters_only_and_merging_equals_the_adapter(tmp_path, gd_dir, shapes):
    """peft wraps Grounding DINO once the model exposes its text embeddings: the default targets are the
    encoder / decoder linears, only adapters train (loss falls, base weights untouched), the saved adapter
    reloads onto the base with equal outputs, and merging it changes nothing either."""
    from transformers import GroundingDinoForObjectDetection

    from mixtune.models.loading import load_model_and_processor
    from mixtune.train.run import build_trainer

    trainer = build_trainer(detection_config(tmp_path, gd_dir, shapes, lora=True, lora_rank=8, lora_alpha=16,
                                             learning_rate=3e-3))
    model = trainer.model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".encoder.layers.0." in n for n in trainable) and any(".decoder.layers.1." in n for n in trainable)
    assert not any("backbone" in n or "text_backbone" in n for n in trainable)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    out = str(tmp_path / "adapter")
    trainer.save_final(out)
    assert os.path.exists(os.path.join(out, "adapter_config.json"))
    batch = trainer.data_collator.inputs([trainer.eval_dataset[i] for i in range(3)], with_labels=False)
    _, reloaded, _ = load_model_and_processor(gd_dir, lora_path=out)
    _, merged, _ = load_model_and_processor(gd_dir, lora_path=out, merge_lora=True)
    plain = GroundingDinoForObjectDetection.from_pretrained(gd_dir).eval()
    with torch.no_grad():
        a, b, c, d = (m.eval()(**batch) for m in (model, reloaded, merged, plain))
    assert torch.allclose(a.logits, b.logits, atol=1e-6) and torch.allclose(a.pred_boxes, b.pred_boxes, atol=1e-6)
    assert torch.allclose(a.logits, c.logits, atol=1e-4) and torch.allclose(a.pred_boxes, c.pred_boxes, atol=1e-5)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert (a.pred_boxes - d.pred_boxes).abs().max() > 1e-3  # the adapters did change the model


def test_freeze_text_encoder_freezes_bert_only(tmp_path, gd_dir, shapes):
    from mixtune.train.run import build_trainer

    trainer = build_trainer(detection_config(tmp_path, gd_dir, shapes, freeze_text_encoder=True))
    frozen = {n for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("model.text_backbone.", "model.text_projection.")) for n in frozen)
    assert any(n.startswith("model.text_backbone.") for n in frozen)


def test_prompt_longer_than_the_model_reads_is_refused(tmp_path, gd_dir):
    from mixtune.train.run import build_trainer

    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    many = [{"id": i + 1, "name": f"thing number {i}"} for i in range(20)]
    path = tmp_path / "many.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 20, "height": 20}],
                                "annotations": [], "categories": many}))
    config = detection_config(tmp_path, gd_dir, (str(path), str(path)))
    with pytest.raises(DataError, match="over the model's max_text_len 64"):
        build_trainer(config)


def test_predict_writes_coco_results_and_drawn_pictures(tmp_path, gd_dir, shapes):
    from mixtune.cli import main

    out = tmp_path / "pred"
    assert main(["predict", "--model", gd_dir, "--data_files", shapes[1], "--name", "coco_detection",
                 "--output_dir", str(out), "--draw", "--threshold", "0"]) == 0
    results = json.load(open(out / "predictions.json"))
    coco = json.load(open(shapes[1]))
    assert len(results) == 6 * 100  # top 100 (query, phrase) pairs per image
    assert {r["image_id"] for r in results} == {i["id"] for i in coco["images"]}
    assert {r["category_id"] for r in results} <= {1, 2, 3, 4}
    assert all(set(r) == {"image_id", "category_id", "bbox", "score"} and len(r["bbox"]) == 4 for r in results)
    drawn = sorted(os.listdir(out / "drawn"))
    assert len(drawn) == 6
    picture = np.asarray(Image.open(out / "drawn" / drawn[0]))
    original = np.asarray(Image.open(os.path.join(os.path.dirname(shapes[1]), coco["images"][0]["file_name"])))
    scale = 384 // 96  # small pictures are enlarged for reading
    enlarged = np.asarray(Image.fromarray(original).resize((96 * scale, 96 * scale), Image.NEAREST))
    assert picture.shape == enlarged.shape and (picture != enlarged).any()  # boxes drawn over it


def test_class_nms_drops_only_same_phrase_overlaps():
    from mixtune.tasks.detection import class_nms

    boxes = [[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [50, 50, 5, 5]]  # IoU of the first two: 81/119
    detection = (boxes, [0, 0, 1, 0], [0.9, 0.8, 0.7, 0.6])
    kept_boxes, phrases, scores = class_nms(detection, 0.5)
    assert scores == [0.9, 0.7, 0.6] and phrases == [0, 1, 0] and kept_boxes == [boxes[0], boxes[2], boxes[3]]
    assert class_nms(detection, 0.7)[2] == [0.9, 0.8, 0.7, 0.6]  # 0.68 is under 0.7: all kept
    assert class_nms(([], [], []), 0.5) == ([], [], [])


def test_predict_nms_iou_reaches_class_nms(tmp_path, gd_dir, shapes, monkeypatch):
    """The tiny untrained model's boxes barely overlap, so the wiring is checked with a stand-in NMS that keeps
    each image's best detection (class_nms itself: the test above)."""
    import mixtune.tasks.detection as detection
    from mixtune.cli import main

    calls = []

    def best_only(det, iou):
        calls.append(iou)
        return [det[0][0]], [det[1][0]], [det[2][0]]

    monkeypatch.setattr(detection, "class_nms", best_only)
    out = tmp_path / "pred"
    assert main(["predict", "--model", gd_dir, "--data_files", shapes[1], "--name", "coco_detection",
                 "--output_dir", str(out), "--nms_iou", "0.3"]) == 0
    results = json.load(open(out / "predictions.json"))
    assert calls == [0.3] * 6 and len(results) == 6


# ---- ONNX ---------------------------------------------------------------------------------------------------

def test_phrase_masks_without_cummax_equal_transformers():
    from transformers.models.grounding_dino.modeling_grounding_dino import (
        generate_masks_with_special_tokens_and_transfer_map as reference)

    from mixtune.export_onnx.grounding_dino import phrase_masks_without_cummax

    special = torch.tensor([101, 102, 1012, 1029])
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        length = int(torch.randint(1, 16, (1,), generator=g))
        ids = torch.tensor([101, 102, 1012, 1029, 5, 7])[torch.randint(0, 6, (3, length), generator=g)]
        for a, b in zip(reference(ids, special), phrase_masks_without_cummax(ids, special)):
            assert torch.equal(a, b)


def test_onnx_export_matches_torch(tmp_path, gd_dir, capsys):
    from mixtune.cli import main
    from mixtune.export_onnx.grounding_dino import run_onnx

    assert main(["export", "--model", gd_dir, "--to", str(tmp_path / "onnx"), "--format", "onnx"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_abs_diff"] < 1e-3
    # other inputs than the traced ones: another batch size and prompt length
    from transformers import AutoProcessor, GroundingDinoForObjectDetection

    processor = AutoProcessor.from_pretrained(tmp_path / "onnx")
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)) for _ in range(3)]
    inputs = processor(images=images, text=["red circle . blue square . green triangle ."] * 3, return_tensors="pt")
    logits, boxes = run_onnx(report["onnx"], inputs)
    model = GroundingDinoForObjectDetection.from_pretrained(gd_dir).eval()
    with torch.no_grad():
        want = model(**inputs)
    finite = np.isfinite(want.logits.numpy())
    assert np.abs(logits[finite] - want.logits.numpy()[finite]).max() < 1e-3
    assert np.abs(boxes - want.pred_boxes.numpy()).max() < 1e-3


# ---- the demo (minutes) -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_detection_demo_reaches_ap50(tmp_path):
    from mixtune.tools.detection_demo import run_detection_demo

    report = run_detection_demo(str(tmp_path / "demo"))
    assert report["before"] < 0.05 and report["after"] >= 0.5
    assert os.path.isfile(report["drawn_prediction"])


def test_eager_attention_is_refused_for_grounding_dino(gd_dir):
    # transformers' eager path mixes the prompt's phrases for this family: loading must refuse, not train it
    from mixtune.errors import ConfigError
    from mixtune.models.loading import load_model_and_processor

    with pytest.raises(ConfigError, match="attn_implementation.*eager.*grounding_dino"):
        load_model_and_processor(gd_dir, attn_implementation="eager")
