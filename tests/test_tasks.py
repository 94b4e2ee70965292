"""The task layer beyond chat: contrastive (CLIP, SigLIP) and classification (timm EVA02) on tiny checkpoints."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from mixtune.config import build_config
from mixtune.errors import ConfigError, DataError
from mixtune.models.registry import families, support_table
from mixtune.tools.demo_data import COLOURS, SHAPES, draw_scene

CONTRASTIVE = [f.name for f in families("contrastive")]
CLASSIFICATION = [f.name for f in families("classification")]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """12 captioned shape images (JSONL) and the same images as an ImageFolder tree by shape."""
    root = tmp_path_factory.mktemp("shapes")
    rng = random.Random(0)
    records = []
    for i in range(12):
        colour, shape = list(COLOURS)[i % 4], SHAPES[i % 3]
        os.makedirs(root / "folder" / shape, exist_ok=True)
        img = draw_scene(rng, colour, shape, "left", 1)
        img.save(root / "folder" / shape / f"{i}.png")
        records.append({"image": f"folder/{shape}/{i}.png", "caption": f"a {colour} {shape}"})
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    six = [{"image": r["image"], "label": r["image"].split("/")[1]} for r in records[:6]]  # two per shape
    captions = [{"image": r["image"], "label": r["caption"]} for r in records]  # 12 distinct captions
    (root / "captions_as_labels.jsonl").write_text("\n".join(json.dumps(r) for r in captions))
    (root / "six.jsonl").write_text("\n".join(json.dumps(r) for r in six))
    return root


def config(tmp_path, model_dir, base, train, evals=None, **over):
    raw = {"model_name_or_path": model_dir, "dataset": {"train": train, **({"eval": evals} if evals else {})},
           "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 6, "learning_rate": 2e-3,
           "max_steps": 12, "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True, "seed": 0,
           "eval_strategy": "no", **over}
    return build_config(raw, str(base))


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def pairs_entry():
    return [{"name": "coco_caption", "data_files": "pairs.jsonl"}]


@pytest.mark.parametrize("family", CONTRASTIVE)
def test_contrastive_trains_and_reloads_in_transformers(family, tiny_model_dir, shapes, tmp_path):
    import transformers

    from mixtune.train.run import build_trainer

    trainer = build_trainer(config(tmp_path, tiny_model_dir(family), shapes, pairs_entry(), pairs_entry(),
                                   learning_rate=5e-4, max_steps=24))
    trainer.train()
    first, last = losses(trainer)[:3], losses(trainer)[-3:]
    assert sum(last) / 3 < sum(first) / 3 - 0.02, losses(trainer)  # tiny CLIP from scratch learns slowly
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_t2i_r1", "eval_i2t_r5", "eval_t2i_r10"} <= set(metrics)
    out = str(tmp_path / "saved")
    trainer.save_model(out)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    batch["return_loss"] = False
    trainer.model.eval()
    if family in ("open_clip", "coca"):  # open_clip's own loader, from the saved folder
        import open_clip

        reloaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
        reloaded.eval().output_dict = True
        with torch.no_grad():
            got = reloaded(batch["pixel_values"], batch["input_ids"])
            mine = trainer.model(**batch)
        assert torch.allclose(got["image_features"], mine.image_embeds, atol=1e-6, rtol=0)
        assert torch.allclose(got["text_features"], mine.text_embeds, atol=1e-6, rtol=0)
        return
    classes = {"clip": "CLIPModel", "siglip": "SiglipModel", "siglip2": "Siglip2Model"}
    model_class = getattr(transformers, classes[family])
    reloaded = model_class.from_pretrained(out).eval()
    transformers.AutoProcessor.from_pretrained(out)  # the processor travels with the model
    with torch.no_grad():
        assert torch.equal(trainer.model(**batch).logits_per_image, reloaded(**batch).logits_per_image)


@pytest.mark.parametrize("family", [f.name for f in families("contrastive") if f.supports_lora])
def test_contrastive_lora_trains_only_adapters(family, tiny_model_dir, shapes, tmp_path):
    from mixtune.train.run import build_trainer

    trainer = build_trainer(config(tmp_path, tiny_model_dir(family), shapes, pairs_entry(), lora=True,
                                   max_steps=3, learning_rate=1e-2))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    from mixtune.models.registry import get_family
    from mixtune.train.freeze import part_of

    base_names = [n.removeprefix("base_model.model.") for n in trainable]
    assert {part_of(n, get_family(family)) for n in base_names} >= {"vision", "text"}  # adapters on both towers
    trainer.train()
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n


@pytest.mark.parametrize("family,parts", [(f, p) for f in CONTRASTIVE for p in (["vision"], ["text"])] +
                         [(f, p) for f in CLASSIFICATION for p in (["backbone"], ["head"])] + [("coca", ["decoder"])])
def test_freeze_shortcuts_cover_named_parts(family, parts, tiny_model_dir, shapes, tmp_path):
    from mixtune.models.registry import get_family
    from mixtune.train.freeze import part_of
    from mixtune.train.run import build_trainer

    fam = get_family(family)
    train = pairs_entry() if fam.task == "contrastive" else [{"name": "imagefolder", "data_files": "folder"}]
    trainer = build_trainer(config(tmp_path, tiny_model_dir(family), shapes, train,
                                   **{f"freeze_{p}": True for p in parts}))
    frozen = {n for n, p in trainer.model.named_parameters() if not p.requires_grad}
    expected = {n for n, _ in trainer.model.named_parameters() if part_of(n, fam) in parts}
    assert frozen == expected and frozen
    with pytest.raises(ConfigError, match="no 'language' part"):
        build_trainer(config(tmp_path, tiny_model_dir(family), shapes, train, freeze_language=True))


def test_retrieval_recall_counts_ranks():
    from mixtune.tasks.contrastive import retrieval_recall

    images = torch.eye(3)
    # text 0 -> its image a first; text 1 -> b, but c ranks above it; text 2 -> c first
    texts = torch.tensor([[1.0, 0, 0], [0, 0.5, 0.9], [0.5, 0, 0.8]])
    out = retrieval_recall(texts, images, ["a", "b", "c"])
    assert out["t2i_r1"] == pytest.approx(2 / 3) and out["t2i_r5"] == 1.0
    # image a: text 0 first; image b: text 1 first; image c: text 1 (0.9) above its own text 2 (0.8)
    assert out["i2t_r1"] == pytest.approx(2 / 3)
    # two captions of one image: either counts for image->text, each is scored for text->image
    out = retrieval_recall(torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0]]), torch.eye(2)[[0, 0, 1]], ["a", "a", "b"])
    assert out["t2i_r1"] == 1.0 and out["i2t_r1"] == 1.0


@pytest.mark.parametrize("family", CONTRASTIVE)
def test_zero_shot_classification_agrees_with_retrieval(family, tiny_model_dir, shapes, tmp_path):
    """With every image's own caption as its class name (template "{label}"), zero-shot top-1 is exactly
    image->text R@1 over the same pairs: two code paths, one number."""
    from mixtune.train.run import build_trainer

    evals = pairs_entry() + [{"name": "image_label", "data_files": "captions_as_labels.jsonl", "prompt": "{label}"}]
    trainer = build_trainer(config(tmp_path, tiny_model_dir(family), shapes, pairs_entry(), evals, max_steps=6,
                                   learning_rate=5e-4))
    trainer.train()
    metrics = trainer.evaluate()
    zero_shot = metrics["eval_zeroshot_captions_as_labels_top1"]
    assert zero_shot == pytest.approx(metrics["eval_i2t_r1"]) and 0 < zero_shot < 1, metrics


def test_chat_sample_becomes_a_pair(demo_data_dir, tiny_model_dir, tmp_path):
    from mixtune.data.dataset import DatasetEntry
    from mixtune.tasks.contrastive import read_pairs
    from mixtune.data.badsamples import BadSamples

    entry = DatasetEntry(name="chatml_dataset", data_files="train.json", base_dir=demo_data_dir)
    pairs = read_pairs(entry, BadSamples("error", entry="train"))
    raw = json.load(open(os.path.join(demo_data_dir, "train.json")))
    assert len(pairs) == len(raw)
    first = raw[0]
    reply = first["conversations"][0][1] if "conversations" in first else first["messages"][1]["content"]
    image = first.get("image") or first["images"][0]
    assert pairs[0].text == reply and pairs[0].image == os.path.join(demo_data_dir, image)


@pytest.mark.parametrize("family", CLASSIFICATION)
def test_classification_trains_and_reloads_in_timm(family, tiny_model_dir, shapes, tmp_path):
    import timm

    from mixtune.train.run import build_trainer

    folder = [{"name": "imagefolder", "data_files": "folder"}]
    six = [{"name": "image_label", "data_files": "six.jsonl"}]  # one fixed batch: a tiny ViT learns it slowly
    trainer = build_trainer(config(tmp_path, tiny_model_dir(family), shapes, six, folder, max_steps=20,
                                   learning_rate=1e-3))
    trainer.train()
    first, last = losses(trainer)[:3], losses(trainer)[-3:]
    assert sum(last) / 3 < sum(first) / 3 - 0.05, losses(trainer)
    metrics = trainer.evaluate()
    assert 0 <= metrics["eval_top1"] <= 1
    out = str(tmp_path / "saved")
    trainer.save_model(out)
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert json.load(open(os.path.join(out, "config.json")))["label_names"] == ["circle", "square", "triangle"]
    x = torch.stack([trainer.train_dataset[i]["pixel_values"] for i in range(4)])
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(trainer.model(x), reloaded(x))


def test_topk_accuracy_and_label_errors(tiny_model_dir, shapes, tmp_path):
    from transformers import EvalPrediction

    from mixtune.tasks.classification import topk_accuracy
    from mixtune.train.run import build_trainer

    logits = torch.tensor([[0.9, 0.1] + [0.0] * 5, [0.1, 0.2] + [0.0] * 4 + [0.3]]).numpy()
    got = topk_accuracy(EvalPrediction(predictions=logits, label_ids=torch.tensor([0, 1]).numpy()))
    assert got == {"top1": 0.5, "top5": 1.0}  # the second row's label 1 ranks second
    (shapes / "labels.jsonl").write_text(json.dumps({"image": "folder/circle/0.png", "label": "circle"}) + "\n" +
                                         json.dumps({"image": "folder/circle/0.png", "label": "hexagon"}))
    evals = [{"name": "image_label", "data_files": "labels.jsonl"}]
    trainer = build_trainer(config(tmp_path, tiny_model_dir("timm"), shapes,
                                   [{"name": "imagefolder", "data_files": "folder"}], evals))
    with pytest.raises(DataError, match=r"labels.jsonl.*label 'hexagon' is not a class"):
        trainer.eval_dataset[1]


def test_mixup_gives_soft_targets_and_trains(tiny_model_dir, shapes, tmp_path):
    from mixtune.train.run import build_trainer

    trainer = build_trainer(config(tmp_path, tiny_model_dir("timm"), shapes,
                                   [{"name": "imagefolder", "data_files": "folder"}], max_steps=2,
                                   mixup_alpha=0.8, label_smoothing_factor=0.1))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert batch["labels"].shape == (4, 3) and torch.allclose(batch["labels"].sum(1), torch.ones(4))
    assert trainer.train().training_loss > 0


def test_task_follows_the_checkpoint_and_refuses_mismatches(tiny_model_dir, shapes, tmp_path):
    from mixtune.train.run import build_trainer

    with pytest.raises(ConfigError, match="trains for 'contrastive'"):
        build_trainer(config(tmp_path, tiny_model_dir("clip"), shapes, pairs_entry(), task="classification"))
    with pytest.raises(ConfigError, match="does not fit the contrastive task"):
        build_trainer(config(tmp_path, tiny_model_dir("clip"), shapes, [{"name": "imagefolder",
                                                                          "data_files": "folder"}]))
    table = support_table()
    assert [line.split()[3] for line in table.splitlines() if line.startswith("coca ")] == ["yes"]  # LoRA column
    assert all(any(line.split()[:1] == [f] and t in line for line in table.splitlines())
               for f, t in (("clip", "contrastive"), ("siglip", "contrastive"), ("siglip2", "contrastive"),
                            ("timm", "classification"),
                            ("qwen2_vl", "chat")))


@pytest.mark.slow
@pytest.mark.parametrize("task,floor", [("contrastive", 0.8), ("classification", 0.9)])
def test_task_demo_learns_held_out(task, floor, tmp_path):
    """`mixtune demo --task ...`: measured on the 2-core CPU, contrastive t2i R@1 0.08 -> 0.92 (41 s of
    training), classification top-1 0.30 -> 0.98 (43 s)."""
    from mixtune.tools.task_demo import run_task_demo

    report = run_task_demo(task, str(tmp_path / "demo"))
    assert report["before"] < 0.5 and report["after"] >= floor, report


def _gathered_rank(rank: int, world: int, model_dir: str, batch_file: str, out_file: str) -> None:
    import torch.distributed as dist
    import transformers

    from mixtune.tasks.contrastive import gathered_pair_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_file}.init", rank=rank, world_size=world)
    batch = torch.load(batch_file)
    model = transformers.AutoModel.from_pretrained(model_dir)
    half = len(batch["input_ids"]) // world
    local = {k: v[rank * half:(rank + 1) * half] if torch.is_tensor(v) else v for k, v in batch.items()}
    loss = gathered_pair_loss(model, model, local)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for g in grads.values():  # what data parallel does: the mean over ranks
        dist.all_reduce(g)
        g /= world
    if rank == 0:
        torch.save({"loss": loss.detach(), "grads": grads}, out_file)
    dist.destroy_process_group()


# two spawned processes cost ~15 s: SigLIP's run is in the slow suite
@pytest.mark.parametrize("family", ["clip", pytest.param("siglip", marks=pytest.mark.slow),
                                    pytest.param("siglip2", marks=pytest.mark.slow)])
def test_negatives_gathered_across_two_ranks_equal_one_process(family, tiny_model_dir, shapes, tmp_path):
    import torch.multiprocessing as mp
    import transformers

    from mixtune.train.run import build_trainer

    trainer = build_trainer(config(tmp_path, tiny_model_dir(family), shapes, pairs_entry()))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    torch.save(batch, tmp_path / "batch.pt")
    mp.spawn(_gathered_rank, args=(2, tiny_model_dir(family), str(tmp_path / "batch.pt"), str(tmp_path / "r0.pt")),
             nprocs=2)
    two = torch.load(tmp_path / "r0.pt")
    model = transformers.AutoModel.from_pretrained(tiny_model_dir(family))
    one = model(**batch).loss  # the model's own loss on the whole global batch in one process
    one.backward()
    assert torch.allclose(two["loss"], one.detach(), atol=1e-6), (two["loss"], one)
    for name, param in model.named_parameters():
        if param.grad is not None:
            assert torch.allclose(two["grads"][name], param.grad, atol=1e-5, rtol=1e-4), name


def test_hf_label_reads_class_label_columns_and_image_bytes(shapes, tmp_path):
    import datasets
    from PIL import Image

    from mixtune.data.badsamples import BadSamples
    from mixtune.data.dataset import DatasetEntry
    from mixtune.data.formats import get_reader
    from mixtune.data.images import load_image

    files = sorted((shapes / "folder").glob("*/*.png"))[:4]
    features = datasets.Features({"img": datasets.Image(), "shape": datasets.ClassLabel(names=list(SHAPES))})
    ds = datasets.Dataset.from_dict({"img": [{"bytes": f.read_bytes(), "path": None} for f in files],
                                     "shape": [SHAPES.index(f.parent.name) for f in files]}, features=features)
    ds.save_to_disk(str(tmp_path / "hf"))
    entry = DatasetEntry(name="hf_label", data_files=str(tmp_path / "hf"), columns={"image": "img", "label": "shape"})
    samples = get_reader("hf_label")(entry, BadSamples("error", entry="hf"))
    assert [s.label for s in samples] == [f.parent.name for f in files]
    assert all(s.image.startswith("hfrow:") for s in samples)  # bytes stay in the arrow file until decoded
    for sample, f in zip(samples, files):  # embedded bytes decode to the same pixels
        assert list(load_image(sample.image).getdata()) == list(Image.open(f).convert("RGB").getdata())


@pytest.mark.parametrize("family", ["clip", "open_clip", "timm"])
def test_resume_matches_the_uninterrupted_run(family, tiny_model_dir, shapes, tmp_path):
    """Resume is shared across tasks: a timm checkpoint (timm's own folder format) and a CLIP one continue
    with the same weights, optimizer, schedule and data order."""
    import shutil

    from mixtune.train.run import train

    data = [{"name": "imagefolder", "data_files": "folder"}] if family == "timm" else pairs_entry()
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, lr_scheduler_type="linear",
                  learning_rate=5e-4, per_device_train_batch_size=4)
    train(config(tmp_path, tiny_model_dir(family), shapes, data, output_dir=str(tmp_path / "full"), **common))
    full_history = json.load(open(tmp_path / "full" / "metrics.json"))["log_history"]
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", part / "checkpoint-3")
    train(config(tmp_path, tiny_model_dir(family), shapes, data, output_dir=str(part),
                 resume_from_checkpoint="true", **common))
    history = json.load(open(part / "metrics.json"))["log_history"]
    losses_full = {h["step"]: h["loss"] for h in full_history if "loss" in h}
    losses_resumed = {h["step"]: h["loss"] for h in history if "loss" in h}
    for step in (4, 5, 6):
        assert losses_resumed[step] == pytest.approx(losses_full[step], rel=1e-4), step
    assert set(losses_resumed) == {1, 2, 3, 4, 5, 6}  # steps 1-3 come from the checkpoint's state


@pytest.mark.slow
def test_eva_clip_trains_and_reloads_in_open_clip(shapes, tmp_path):
    """EVA-CLIP proper: open_clip's timm EVA02 image tower (224 pixels, 12 blocks) with a tiny text tower."""
    import open_clip

    from mixtune.models.open_clip_family import TINY_EVA_CLIP, tiny_builder
    from mixtune.train.run import build_trainer

    model_dir = tiny_builder(TINY_EVA_CLIP)(str(tmp_path / "eva_clip"))
    trainer = build_trainer(config(tmp_path, model_dir, shapes, pairs_entry(), max_steps=4, learning_rate=5e-4))
    assert trainer.train().training_loss > 0
    out = str(tmp_path / "saved")
    trainer.save_model(out)
    reloaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    reloaded.eval().output_dict = True
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    trainer.model.eval()
    with torch.no_grad():
        mine = trainer.model(batch["pixel_values"], batch["input_ids"], return_loss=False)
        got = reloaded(batch["pixel_values"], batch["input_ids"])
    assert torch.allclose(got["image_features"], mine.image_embeds, atol=1e-6, rtol=0)


def test_coca_caption_metric_scores_its_generated_captions(tiny_model_dir, shapes, tmp_path):
    """A tiny CoCa run's eval logs eval_caption_bleu4 / rouge_l / cider, and they are the metrics module's
    scores of the captions CoCa generates (greedily, so twice the same) against each image's eval captions."""
    from mixtune.infer.metrics import caption_scores
    from mixtune.tasks.caption_eval import generate_captions
    from mixtune.train.run import build_trainer

    trainer = build_trainer(config(tmp_path, tiny_model_dir("coca"), shapes, pairs_entry(), pairs_entry(),
                                   max_steps=12, learning_rate=2e-3))
    trainer.train()
    metrics = trainer.evaluate()
    coca, tokenizer = trainer.model.model, trainer.data_collator.tokenizer.tokenizer
    captions, references = generate_captions(coca, trainer.eval_dataset, tokenizer)
    assert len(captions) == 12 and all(captions), captions  # one non-empty caption per distinct image
    assert references == [[json.loads(line)["caption"]] for line in (shapes / "pairs.jsonl").read_text().splitlines()]
    expected = caption_scores(captions, references)
    for name in ("bleu4", "rouge_l", "cider"):
        assert metrics[f"eval_caption_{name}"] == pytest.approx(expected[name], abs=1e-12), (name, captions)
    logged = [h for h in trainer.state.log_history if "eval_caption_cider" in h]
    assert logged and logged[-1]["eval_caption_cider"] == metrics["eval_caption_cider"]
    # the trained decoder has learned something of the captions: better than no overlap at all
    assert metrics["eval_caption_rouge_l"] > 0, captions


def test_tiny_coca_decoder_projection_is_initialised(tmp_path):
    """open_clip never initialises CoCa's text_decoder.text_projection (torch.empty): the tiny builder does,
    so the checkpoint no longer depends on allocator history (its loss used to start at 1e18-1e32 after other
    tests had run, with or without LoRA)."""
    from safetensors.torch import load_file

    from mixtune.models.open_clip_family import TINY_COCA, WEIGHTS_NAME, tiny_builder

    garbage = torch.full((4096, 4096), 1e30)  # leave freed memory full of huge values for torch.empty to reuse
    del garbage
    weights = load_file(os.path.join(tiny_builder(TINY_COCA)(str(tmp_path / "a")), WEIGHTS_NAME))
    projection = weights["text_decoder.text_projection"]
    width = TINY_COCA["multimodal_cfg"]["width"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    assert projection.std().item() == pytest.approx(width ** -0.5, rel=0.1)  # open_clip's own init
    again = load_file(os.path.join(tiny_builder(TINY_COCA)(str(tmp_path / "b")), WEIGHTS_NAME))
    assert all(torch.equal(weights[k], again[k]) for k in weights)


@pytest.mark.parametrize("key,value", [("chat_template", "t.jinja"), ("min_pixels", 64), ("max_pixels", 4096)])
def test_chat_only_entry_keys_are_refused_by_other_tasks(key, value, tiny_model_dir, shapes, tmp_path):
    # contrastive (like every non-chat task) renders and sizes nothing itself: the key would be ignored
    from mixtune.train.run import build_trainer

    if key == "chat_template":  # an existing template file: the entry's own checks pass, the task refuses it
        (tmp_path / value).write_text("{{ messages }}")
        value = str(tmp_path / value)
    entry = {**pairs_entry()[0], key: value}
    with pytest.raises(ConfigError, match=rf"dataset\.train\[0\]\.{key}.*chat task only"):
        build_trainer(config(tmp_path, tiny_model_dir("clip"), shapes, [entry]))
