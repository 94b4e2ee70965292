"""Segmentation with SAM: COCO masks decoded and checked (bad annotations named or counted), mIoU, a tiny SAM that
trains (loss falls, image encoder frozen by default, LoRA), saves and reloads with equal outputs, `predict`
with RLE results and drawn pictures, and the ONNX export checked against torch."""

import json
import os

import numpy as np
import pytest
import torch

from mixtune.config import build_config
from mixtune.data import masks as mask_codec
from mixtune.data.badsamples import BadSamples
from mixtune.data.dataset import DatasetEntry
from mixtune.data.formats.segmentation import read_mask_samples
from mixtune.errors import DataError
from mixtune.tools.seg_demo import make_shapes_coco


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg_shapes")
    make_shapes_coco(str(root), "train", 8, seed=0)
    make_shapes_coco(str(root), "val", 3, seed=1)
    return root


def entry(base, data_files="train.json", **kw):
    return DatasetEntry.from_config({"name": "coco_segmentation", "data_files": data_files, **kw}, str(base), "test")


def test_polygons_and_both_rle_forms_decode_to_the_same_mask():
    mask = np.zeros((10, 12), bool)
    mask[2:6, 3:9] = True
    rle = mask_codec.encode(mask)
    runs = mask_codec.compressed_counts(rle["counts"])
    assert sum(runs) == 120
    polygon = [[3, 2, 9, 2, 9, 6, 3, 6]]  # pixel edges of the same rectangle
    for segmentation in (rle, {"size": [10, 12], "counts": runs}, polygon):
        assert (mask_codec.segmentation_mask(segmentation, 10, 12) == mask).all()
    assert mask_codec.mask_box(mask) == [3.0, 2.0, 9.0, 6.0]


def coco_with(tmp_path, segmentations):
    from PIL import Image

    Image.new("RGB", (12, 10)).save(tmp_path / "a.png")
    annotations = [{"id": i, "image_id": 1, "bbox": [1, 1, 4, 4], "category_id": 1, "segmentation": s}
                   for i, s in enumerate(segmentations)]
    annotations = [{k: v for k, v in a.items() if v is not None} for a in annotations]
    (tmp_path / "inst.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 12, "height": 10}], "annotations": annotations,
        "categories": [{"id": 1, "name": "thing"}]}))
    return tmp_path


GOOD_POLYGON = [[1, 1, 5, 1, 5, 5]]
BAD_SEGMENTATIONS = [
    ({"size": [10, 12], "counts": [5, 3]}, "counts add up to 8 pixels, the image has 120"),
    ({"size": [10, 12], "counts": "zz!"}, "cannot occur in compressed counts"),
    ({"size": [10, 12], "counts": "P1"}, "counts add up to"),
    ({"size": [12, 10], "counts": [120]}, "is not the image's [height, width]"),
    ([[1, 2, 3, 4]], "at least 6 numbers"),
    ({"size": [10, 12], "counts": [120]}, "empty mask"),
    (None, "has no 'segmentation'"),
]


@pytest.mark.parametrize("segmentation,reason", BAD_SEGMENTATIONS)
def test_bad_segmentation_names_file_index_and_field(tmp_path, segmentation, reason):
    base = coco_with(tmp_path, [GOOD_POLYGON, segmentation])
    with pytest.raises(DataError) as e:
        read_mask_samples(entry(base, "inst.json"), BadSamples("error"))
    assert (e.value.file, e.value.index, e.value.field) == (str(base / "inst.json"), 1, "segmentation")
    assert reason in e.value.reason


def test_bad_segmentations_are_counted_and_skipped(tmp_path):
    base = coco_with(tmp_path, [GOOD_POLYGON] + [s for s, _ in BAD_SEGMENTATIONS] + [GOOD_POLYGON])
    bad = BadSamples("skip")
    samples = read_mask_samples(entry(base, "inst.json"), bad)
    assert [s.index for s in samples] == [0, len(BAD_SEGMENTATIONS) + 1]
    assert [r["index"] for r in bad.records] == list(range(1, len(BAD_SEGMENTATIONS) + 1))
    assert {r["field"] for r in bad.records} == {"segmentation"}


def test_miou_of_perfect_masks_is_one_and_of_empty_masks_zero(shapes):
    samples = read_mask_samples(entry(shapes), BadSamples())
    truth = [mask_codec.decode(s.rle) for s in samples]
    assert len(truth) >= 16 and all(m.any() for m in truth)
    assert mask_codec.mean_iou(truth, truth) == 1.0
    assert mask_codec.mean_iou([np.zeros_like(m) for m in truth], truth) == 0.0
    half = [m.copy() for m in truth]
    for m in half:  # keep the first half of each mask's pixels (in raster order): IoU = kept / total
        ys, xs = np.nonzero(m)
        m[ys[len(ys) // 2:], xs[len(xs) // 2:]] = False
    expected = np.mean([(len(np.nonzero(t)[0]) // 2) / t.sum() for t in truth])
    assert mask_codec.mean_iou(half, truth) == pytest.approx(expected)


def sam_config(tmp_path, model_dir, base, **over):
    raw = {"model_name_or_path": model_dir, "output_dir": str(tmp_path / "out"),
           "dataset": {"train": [{"name": "coco_segmentation", "data_files": "train.json"}],
                       "eval": [{"name": "coco_segmentation", "data_files": "val.json"}]},
           "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16, "learning_rate": 3e-3,
           "max_steps": 10, "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True, "seed": 0,
           "eval_strategy": "no", **over}
    return build_config(raw, str(base))


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_tiny_sam_trains_frozen_encoder_and_reloads_equal(tiny_model_dir, shapes, tmp_path):
    from transformers import SamModel, SamProcessor

    from mixtune.tasks.segmentation import MaskPrep, collate_masks
    from mixtune.train.run import build_trainer

    model_dir = tiny_model_dir("sam")
    trainer = build_trainer(sam_config(tmp_path, model_dir, shapes, max_steps=15, learning_rate=1e-2))
    trainer.train()
    history = losses(trainer)
    assert np.mean(history[-3:]) < np.mean(history[:3]) - 0.1, history
    trained = trainer.evaluate()
    assert 0.0 <= trained["eval_miou"] <= 1.0 and "eval_loss" in trained
    trainer.save_final(str(tmp_path / "out"))
    before, after = SamModel.from_pretrained(model_dir), SamModel.from_pretrained(tmp_path / "out")
    pairs = zip(before.named_parameters(), after.named_parameters())
    changed = {n for (n, a), (_, b) in pairs if not torch.equal(a, b)}
    assert changed and all(n.startswith(("mask_decoder.", "prompt_encoder.", "shared_image_embedding."))
                           for n in changed)  # the image encoder frozen by default
    assert any(n.startswith("mask_decoder.") for n in changed)
    # the Trainer's in-memory model against the reloaded one, on the fixture's prompts
    processor = SamProcessor.from_pretrained(tmp_path / "out")
    samples = read_mask_samples(entry(shapes, "val.json"), BadSamples())
    batch = collate_masks([MaskPrep(processor, False)(s) for s in samples])
    inputs = {k: batch[k] for k in ("pixel_values", "input_boxes")}
    with torch.no_grad():
        a = trainer.model.eval()(**inputs, multimask_output=False).pred_masks
        b = after.eval()(**inputs, multimask_output=False).pred_masks
    assert torch.equal(a, b)
    reloaded = build_trainer(sam_config(tmp_path, str(tmp_path / "out"), shapes, output_dir=str(tmp_path / "o2")))
    assert reloaded.evaluate()["eval_miou"] == trained["eval_miou"]


def test_training_the_encoder_and_lora(tiny_model_dir, shapes, tmp_path):
    from mixtune.train.run import build_trainer

    model_dir = tiny_model_dir("sam")
    full = build_trainer(sam_config(tmp_path, model_dir, shapes, freeze_exclude=["vision_encoder.*"]))
    assert all(p.requires_grad for p in full.model.parameters())
    lora = build_trainer(sam_config(tmp_path, model_dir, shapes, lora=True, output_dir=str(tmp_path / "l")))
    trainable = [n for n, p in lora.model.named_parameters() if p.requires_grad]
    assert any("vision_encoder" in n and "lora_A" in n for n in trainable)
    assert any("mask_decoder" in n and "modules_to_save" in n for n in trainable)
    assert not any("vision_encoder" in n and "lora" not in n for n in trainable)
    lora.train()
    assert losses(lora)[-1] < losses(lora)[0]


def test_point_prompts_train(tiny_model_dir, shapes, tmp_path):
    from mixtune.train.run import build_trainer

    config = sam_config(tmp_path, tiny_model_dir("sam"), shapes, max_steps=4)
    for split in ("train", "eval"):
        config.mix.dataset[split][0]["prompt"] = "point"
    trainer = build_trainer(config)
    item = trainer.train_dataset[0]
    assert "input_points" in item and "input_boxes" not in item and item["input_labels"].tolist() == [[1]]
    trainer.train()
    assert 0.0 <= trainer.evaluate()["eval_miou"] <= 1.0


def test_predict_writes_rle_results_and_pictures(tiny_model_dir, shapes, tmp_path):
    from PIL import Image

    from mixtune.cli import main

    out = tmp_path / "pred"
    dataset = json.dumps({"name": "coco_segmentation", "data_files": str(shapes / "val.json")})
    assert main(["predict", "--model", tiny_model_dir("sam"), "--dataset", dataset, "--output_dir", str(out),
                 "--draw"]) == 0
    results = json.load(open(out / "predictions.json"))
    samples = read_mask_samples(entry(shapes, "val.json"), BadSamples())
    assert [r["annotation_id"] for r in results] == [s.annotation_id for s in samples]
    for r, s in zip(results, samples):
        mask = mask_codec.decode(r["segmentation"])
        assert mask.shape == (s.height, s.width)
        assert r["iou"] == pytest.approx(mask_codec.iou(mask, mask_codec.decode(s.rle)), abs=1e-4)
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["miou"] == pytest.approx(np.mean([r["iou"] for r in results]))
    pictures = sorted(os.listdir(out / "drawn"))
    assert len(pictures) == len({s.image for s in samples})
    assert Image.open(out / "drawn" / pictures[0]).size == (samples[0].width, samples[0].height)


def test_make_tiny_model_cli_writes_a_loadable_sam(tmp_path):
    from transformers import SamModel, SamProcessor

    from mixtune.cli import main
    from mixtune.models.registry import family_for_checkpoint

    assert main(["make-tiny-model", "--family", "sam", "--output_dir", str(tmp_path / "sam")]) == 0
    assert family_for_checkpoint(str(tmp_path / "sam")).task == "segmentation"
    model = SamModel.from_pretrained(tmp_path / "sam")
    assert SamProcessor.from_pretrained(tmp_path / "sam").image_processor.size["longest_edge"] == \
        model.config.vision_config.image_size


@pytest.mark.parametrize("prompt", ["box", "point"])
def test_onnx_export_matches_torch_on_the_fixture(tiny_model_dir, shapes, tmp_path, prompt):
    pytest.importorskip("onnxruntime")
    import onnxruntime
    from transformers import SamModel, SamProcessor

    from mixtune.cli import main
    from mixtune.export_onnx.sam import export_sam
    from mixtune.tasks.segmentation import MaskPrep, collate_masks

    # the tiny checkpoint's decoder starts with near-zero outputs (1e-4): spread its weights so that agreement
    # within 1e-3 means something
    model_dir = str(tmp_path / "sam")
    model = SamModel.from_pretrained(tiny_model_dir("sam"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=g) * 0.1)
    model.save_pretrained(model_dir)
    SamProcessor.from_pretrained(tiny_model_dir("sam")).save_pretrained(model_dir)
    if prompt == "box":  # the CLI's default
        assert main(["export", "--model", model_dir, "--to", str(tmp_path / "onnx"), "--format", "onnx"]) == 0
        files = {name: str(tmp_path / "onnx" / f"{name}.onnx") for name in ("image_encoder", "mask_decoder")}
    else:
        report = export_sam(model_dir, str(tmp_path / "onnx"), prompt=prompt)
        assert max(report["max_abs_difference"].values()) <= 1e-3
        files = report["files"]
    # and on the fixture's real images and prompts, through the processor saved beside the files
    model = SamModel.from_pretrained(model_dir).eval()
    processor = SamProcessor.from_pretrained(tmp_path / "onnx")
    samples = read_mask_samples(entry(shapes, "val.json", prompt=prompt), BadSamples())
    batch = collate_masks([MaskPrep(processor, False)(s) for s in samples])
    run = {name: onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
           for name, path in files.items()}
    (embeddings,) = run["image_encoder"].run(None, {"pixel_values": batch["pixel_values"].numpy()})
    prompts = {k: batch[k]
               for k in ("input_boxes", "input_points", "input_labels") if k in batch}
    masks, scores = run["mask_decoder"].run(None, {"image_embeddings": embeddings,
                                                   **{k: v.numpy() for k, v in prompts.items()}})
    with torch.no_grad():
        want = model(pixel_values=batch["pixel_values"], **prompts, multimask_output=False)
    assert np.abs(masks - want.pred_masks.numpy()).max() <= 1e-3
    assert np.abs(scores - want.iou_scores.numpy()).max() <= 1e-3
    assert np.abs(want.pred_masks.numpy()).max() > 0.05  # 50x the tolerance: outputs that do not vanish


def test_training_scores_the_masks_that_evaluation_scores(tiny_model_dir, shapes):
    """The loss's target is each object's own mask (on the padded input) and the loss's IoU (the IoU head's
    target) of any low-resolution logits equals the IoU evaluation reports for them after `post_process_masks`.
    A target thresholded at the decoder's quarter resolution lost object edges (a perfect low-resolution mask
    scored mIoU 0.88 on the demo's shapes)."""
    from transformers import SamProcessor

    from mixtune.tasks.segmentation import MaskPrep, collate_masks, mask_iou_of_logits, upscale_logits

    processor = SamProcessor.from_pretrained(tiny_model_dir("sam"))
    samples = read_mask_samples(entry(shapes, "val.json"), BadSamples())
    batch = collate_masks([MaskPrep(processor, False)(s) for s in samples])
    truth = [mask_codec.decode(s.rle) for s in samples]
    for target, mask, (h, w) in zip(batch["target"], truth, batch["reshaped_size"].tolist()):
        assert torch.equal(target[:h, :w].bool(), torch.from_numpy(mask)) and not target[h:, w:].any()
    low = processor.image_processor.mask_pad_size["height"]
    logits = torch.randn(len(samples), low, low, generator=torch.Generator().manual_seed(0)) * 4
    logits[:, : low // 2] += 3  # masks of some size, not noise around zero
    trained = mask_iou_of_logits(upscale_logits(logits, tuple(batch["target"].shape[-2:])), batch["target"])
    full = processor.image_processor.post_process_masks(list(logits[:, None, None]), batch["original_size"],
                                                        batch["reshaped_size"])
    scored = [mask_codec.iou(m[0, 0].numpy(), t) for m, t in zip(full, truth)]
    assert trained.tolist() == pytest.approx(scored, abs=1e-6) and 0 < min(scored) and max(scored) < 1
