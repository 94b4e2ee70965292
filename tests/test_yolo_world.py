"""YOLO-World through ultralytics (the optional extra `yolo`) on a tiny checkpoint: it loads through
ultralytics' own loader, its class embeddings come from the folder's CLIP through transformers, training
through `mixtune train`'s path lowers ultralytics' loss, the saved checkpoint reloads with equal outputs,
`mixtune predict` writes COCO results and drawn pictures, and a missing extra is one line."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_config
from mixtune.tools.detection_demo import make_detection_data

@pytest.fixture(scope="session")
def yw_dir(tmp_path_factory):
    pytest.importorskip("ultralytics")
    from mixtune.models.yolo_world import build_tiny

    return build_tiny(str(tmp_path_factory.mktemp("yw") / "tiny"))


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("yw_shapes")
    return make_detection_data(str(root), 16, "train"), make_detection_data(str(root), 6, "val")


def world_config(tmp_path, yw_dir, shapes, **overrides):
    from mixtune.config import load_config

    keys = dict(per_device_train_batch_size=8, per_device_eval_batch_size=6, learning_rate=2e-3, max_steps=12,
                logging_steps=1, save_strategy="no")
    path = write_config(tmp_path, yw_dir, shapes[0], dataset={
        "train": [{"name": "coco_detection", "data_files": shapes[0]}],
        "eval": [{"name": "coco_detection", "data_files": shapes[1]}]}, **{**keys, **overrides})
    return load_config(path)


def test_tiny_checkpoint_loads_through_ultralytics_with_clip_embeddings(yw_dir):
    from ultralytics import YOLOWorld

    from mixtune.models.registry import family_for_checkpoint
    from mixtune.models.yolo_world import clip_text_embeddings, load_world, phrase_embeddings

    assert family_for_checkpoint(yw_dir).name == "yolo_world"
    plain = YOLOWorld(os.path.join(yw_dir, "model.pt"))  # ultralytics' own entry point, no mixtune involved
    assert plain.names == {0: "circle", 1: "square", 2: "triangle"}
    model, _ = load_world(yw_dir)
    clip = clip_text_embeddings(os.path.join(yw_dir, "text_encoder"), ["circle", "red square"])
    assert torch.allclose(clip.norm(dim=-1), torch.ones(2))
    assert torch.allclose(model.txt_feats[0, 0], clip[0], atol=1e-6)  # the stored class is CLIP's embedding
    got = phrase_embeddings(model, ["red square", "circle"])
    assert torch.allclose(got["red square"], clip[1], atol=1e-6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, yw_dir, shapes):
    """(trainer, saved folder) after 12 steps through `mixtune train`'s own build."""
    from mixtune.train.run import build_trainer

    tmp = tmp_path_factory.mktemp("yw_train")
    trainer = build_trainer(world_config(tmp, yw_dir, shapes))
    trainer.train()
    out = str(tmp / "saved")
    trainer.save_final(out)
    return trainer, out


def test_loss_falls_and_the_saved_model_reloads_equal(trained):
    from mixtune.models.yolo_world import load_world
    from mixtune.tasks.yolo_world import forward

    trainer, out = trained
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_map", "eval_map_50", "eval_map_75"} <= set(metrics)
    reloaded, config = load_world(out)
    assert config["weights"] == "model.pt" and os.path.isabs(config["text_encoder"])
    assert reloaded.names == {0: "red circle", 1: "blue square", 2: "green triangle", 3: "yellow circle"}
    model = trainer.model.eval()
    batch = trainer.data_collator.inputs([trainer.eval_dataset[i] for i in range(3)], with_labels=False)
    with torch.no_grad():
        a, b = forward(model, batch)[0], forward(reloaded.eval(), batch)[0]
    assert torch.equal(a, b)


def test_mixed_phrase_lists_pad_without_changing_an_images_detections(yw_dir, shapes, tmp_path):
    """An image batched with a longer phrase list gets the same scores for its own phrases as alone."""
    from mixtune.data.formats.detection import DetectionSample
    from mixtune.models.yolo_world import load_world, phrase_embeddings
    from mixtune.tasks.yolo_world import WorldCollator, forward

    model, _ = load_world(yw_dir)
    model.eval()
    img = Image.new("RGB", (80, 60), (200, 30, 30))
    a = DetectionSample("a.png", 80, 60, [(10, 10, 20, 20)], [0], ("red circle",))
    b = DetectionSample("b.png", 80, 60, [], [], ("blue square", "green triangle", "circle"))
    collator = WorldCollator(96, phrase_embeddings(model, ["red circle", "blue square", "green triangle", "circle"]))
    with torch.no_grad():
        alone = forward(model, collator.inputs([{"image": img, "sample": a}], with_labels=False))[0]
        mixed = forward(model, collator.inputs([{"image": img, "sample": a}, {"image": img, "sample": b}],
                                               with_labels=False))[0]
    assert torch.allclose(alone[0], mixed[0, :5], atol=1e-5)  # 4 box values + its one phrase
    assert (mixed[0, 5:] == 0).all()  # the padded phrases score nothing


def test_predict_writes_coco_results_and_drawn_pictures(tmp_path, trained, shapes):
    from mixtune.cli import main

    out = tmp_path / "pred"
    assert main(["predict", "--model", trained[1], "--data_files", shapes[1], "--name", "coco_detection",
                 "--output_dir", str(out), "--draw", "--threshold", "0"]) == 0
    results = json.load(open(out / "predictions.json"))
    summary = json.load(open(out / "predict_summary.json"))
    coco = json.load(open(shapes[1]))
    assert results and len(results) <= 6 * 100 and summary["detections"] == len(results)
    assert {r["image_id"] for r in results} <= {i["id"] for i in coco["images"]}
    assert {r["category_id"] for r in results} <= {1, 2, 3, 4}
    for r in results:
        x, y, w, h = r["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 96.01 and y + h <= 96.01 and w >= 0 and h >= 0
    assert 0.0 <= summary["map_50"] <= 1.0
    drawn = sorted(os.listdir(out / "drawn"))
    assert len(drawn) == 6
    picture = np.asarray(Image.open(out / "drawn" / drawn[0]))
    original = np.asarray(Image.open(os.path.join(os.path.dirname(shapes[1]), coco["images"][0]["file_name"])))
    enlarged = np.asarray(Image.fromarray(original).resize((384, 384), Image.NEAREST))
    assert picture.shape == enlarged.shape and (picture != enlarged).any()


def test_missing_extra_is_one_line(tmp_path, monkeypatch, capsys):
    import importlib.util

    from mixtune.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ultralytics" else real(name, *a))
    folder = tmp_path / "yw"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "yolo_world", "weights": "yolov8s-worldv2.pt"}))
    shapes = make_detection_data(str(tmp_path), 2, "train")
    path = write_config(tmp_path, str(folder), shapes, dataset={"train": [{"name": "coco_detection",
                                                                           "data_files": shapes}]})
    assert main(["train", path]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mixtune: error: YOLO-World needs ultralytics (AGPL-3.0 licence): pip install 'mixtune[yolo]'"]


def test_lora_is_refused(tmp_path, yw_dir, shapes):
    from mixtune.errors import ConfigError
    from mixtune.train.run import build_trainer

    with pytest.raises(ConfigError, match="LoRA on yolo_world is not supported"):
        build_trainer(world_config(tmp_path, yw_dir, shapes, lora=True))


@pytest.mark.slow
def test_yolo_world_demo_reaches_ap50(tmp_path):
    pytest.importorskip("ultralytics")
    from mixtune.tools.detection_demo import run_detection_demo

    report = run_detection_demo(str(tmp_path / "demo"), family="yolo_world")
    assert report["family"] == "yolo_world" and report["before"] < 0.05 and report["after"] >= 0.5
    assert os.path.isfile(report["drawn_prediction"])


def test_resume_from_a_checkpoint_continues_the_same_run(tmp_path, yw_dir, shapes):
    """A run resumed from its step-3 checkpoint (ultralytics' model.pt read back) logs the losses of steps 4-6
    that the uninterrupted run logged."""
    from mixtune.train.run import train

    def losses(out):
        history = json.load(open(os.path.join(out, "metrics.json")))["log_history"]
        return {h["step"]: h["loss"] for h in history if "loss" in h}

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = world_config(tmp_path / "a", yw_dir, shapes, max_steps=6, save_strategy="steps", save_steps=3,
                         per_device_train_batch_size=4, dataloader_num_workers=0)
    train(first)
    out = first.training.output_dir
    assert os.path.isfile(os.path.join(out, "checkpoint-3", "model.pt"))
    second = world_config(tmp_path / "b", yw_dir, shapes, max_steps=6, per_device_train_batch_size=4,
                          dataloader_num_workers=0, resume_from_checkpoint=os.path.join(out, "checkpoint-3"))
    train(second)
    a, b = losses(out), losses(second.training.output_dir)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]  # the resumed run keeps the checkpoint's history
    assert all(abs(a[s] - b[s]) < 1e-4 for s in (4, 5, 6)), (a, b)


def test_a_phrase_without_embedding_and_no_text_encoder_is_one_clear_error(tmp_path, yw_dir):
    from mixtune.errors import MixtuneError
    from mixtune.models.yolo_world import load_world, phrase_embeddings

    model, _ = load_world(yw_dir)
    assert set(phrase_embeddings(model, ["circle", "square"])) == {"circle", "square"}  # carried by the weights
    model.mixtune_folder["text_encoder"] = None
    with pytest.raises(MixtuneError, match="'red circle'.*names no 'text_encoder'"):
        phrase_embeddings(model, ["circle", "red circle"])


def test_a_corrupt_image_still_raises_pils_own_error_after_ultralytics_loads(yw_dir, tmp_path):
    # ultralytics replaces PIL.Image.open on import; mixtune's bad-image checks rely on PIL's error
    from PIL import Image, UnidentifiedImageError

    from mixtune.models.yolo_world import load_world

    load_world(yw_dir)
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(UnidentifiedImageError):
        Image.open(bad)
