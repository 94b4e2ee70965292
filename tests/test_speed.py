"""Speed cuts change nothing: each gives the same per-token losses and gradients as the plain step (fp32)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from PIL import Image

from conftest import write_config, write_json
from mixtune.config import load_config
from mixtune.data.collate import PadCollator
from mixtune.data.encode import IGNORE_INDEX
from mixtune.data.pack import PackCollator, use_packed_sdpa
from mixtune.models.loading import load_model_and_processor
from mixtune.train.loss import accepts_logits_to_keep, keep_labelled_positions
from test_packing import loss_and_grads, per_token_losses, uneven_samples

TOL = 1e-5


def batches(name, model_dir, tmp_path, packed: bool):
    """(model, family, batch) for a padded batch of uneven samples or two MixToken rows of them."""
    family, model, processor = load_model_and_processor(model_dir, "sdpa")
    model.eval()  # no dropout; gradients still flow
    samples = uneven_samples(tmp_path, processor, family)
    pad = processor.tokenizer.pad_token_id
    if not packed:
        return model, family, PadCollator(pad, family.collate_media)(samples)
    use_packed_sdpa(model)
    packs = [[samples[0], samples[1], samples[4]], [samples[2], samples[3]]]
    return model, family, PackCollator(pad, partial(family.pack_positions, model),
                                       collate_media=family.collate_media)(packs)


def assert_same(ref, ref_grads, got, grads):
    assert abs(got.loss.item() - ref.loss.item()) <= TOL
    assert ref_grads.keys() == grads.keys() and len(grads) > 10
    worst = max((grads[k] - ref_grads[k]).abs().max().item() for k in grads)
    assert worst <= TOL, worst


@pytest.mark.parametrize("name", ["qwen2_vl", "llava"])
@pytest.mark.parametrize("packed", [False, True])
def test_labelled_logits_only_gives_the_same_losses_and_gradients(tiny_model_dir, tmp_path, name, packed):
    model, _, batch = batches(name, tiny_model_dir(name), tmp_path, packed)
    assert accepts_logits_to_keep(model)
    ref, ref_grads = loss_and_grads(model, batch)
    cut = keep_labelled_positions(batch)
    got, grads = loss_and_grads(model, cut)
    keep = cut["logits_to_keep"]
    # only labelled positions were projected: far fewer than all positions
    assert got.logits.shape == (int(keep.sum()), ref.logits.shape[-1])
    assert 20 < keep.sum() < 0.5 * keep.numel()
    # per token: each kept logit row gives the loss the full logits give at that position
    labels = batch["labels"]
    rows = [(r, 0, labels.shape[1]) for r in range(labels.shape[0])]
    ref_tokens = per_token_losses(ref.logits, labels, rows)
    got_tokens = torch.nn.functional.cross_entropy(got.logits, cut["shift_labels"], reduction="none")
    assert got_tokens.shape == ref_tokens.shape
    assert (got_tokens - ref_tokens).abs().max() <= TOL
    assert_same(ref, ref_grads, got, grads)


def test_labels_at_every_position_keep_every_position_but_the_last():
    labels = torch.tensor([[5, 6, IGNORE_INDEX, 7], [IGNORE_INDEX, 8, 9, IGNORE_INDEX]])
    cut = keep_labelled_positions({"input_ids": labels.clamp(min=0), "labels": labels})
    assert cut["logits_to_keep"].tolist() == [[True, False, True, False], [True, True, False, False]]
    assert cut["shift_labels"].tolist() == [6, 7, 8, 9]


@pytest.mark.parametrize("enabled", [True, False])
def test_trainer_step_uses_labelled_logits_and_config_can_turn_it_off(tiny_model_dir, tmp_path, enabled):
    from mixtune.train.run import build_trainer

    Image.new("RGB", (112, 112), (220, 30, 30)).save(tmp_path / "sq.png")
    records = [{"image": "sq.png", "conversations": [["<image>What colour is the shape?", "red " * (1 + i % 3)]]}
               for i in range(4)]
    data = write_json(tmp_path / "data.json", records)
    trainer = build_trainer(load_config(write_config(tmp_path, tiny_model_dir("qwen2_vl"), data, max_steps=1,
                                                     labelled_logits_only=enabled)))
    assert trainer.labelled_logits_only is enabled
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    seen = {}
    hook = trainer.model.lm_head.register_forward_hook(lambda m, i, o: seen.update(rows=o.shape[:-1].numel()))
    trainer.model.eval()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    hook.remove()
    plain = trainer.model(**batch).loss
    assert abs(loss.item() - plain.item()) <= TOL
    labelled = int(batch["labels"][:, 1:].ne(IGNORE_INDEX).sum())
    assert seen["rows"] == (labelled if enabled else batch["labels"].numel())


def test_step_profile_prints_every_phase_and_the_cut_keeps_the_loss(tmp_path):
    """benchmarks/step_profile.py at tiny size: one RESULT per setting, the phases summing to the step, and the
    settings training the same weights on the same batches to the same losses."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.path.join(root, "src"), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "step_profile.py"), "--steps", "2",
                          "--warmup", "1", "--samples", "8", "--settings", "plain,labelled,recompute_vision"],
                         capture_output=True, text=True, env=env, check=True).stdout
    results = [json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")]
    assert [r["setting"] for r in results] == ["plain", "labelled", "recompute_vision"]
    for r in results:
        ms = r["ms"]
        assert all(ms[k] > 0 for k in ("data", "vision", "language", "backward", "optimizer"))
        assert r["threads"] == 1
    assert abs(results[0]["mean_loss"] - results[1]["mean_loss"]) < 1e-5
    assert abs(results[0]["mean_loss"] - results[2]["mean_loss"]) < 1e-5


def vision_grad_outputs(model, family):
    """Counts forward outputs of the vision tower's modules (projector aside) that require grad."""
    from mixtune.train.freeze import part_of

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    seen = []

    def hook(module, args, out):
        out = out[0] if isinstance(out, tuple) else getattr(out, "last_hidden_state", out)
        seen.append(bool(torch.is_tensor(out) and out.requires_grad))
    handles = [m.register_forward_hook(hook) for n, m in base.named_modules()
               if n and part_of(f"{n}.weight", family) == "vision"]
    return seen, handles


def frozen_vision_model(name, model_dir, lora: bool):
    from mixtune.config import MixtuneArgs
    from mixtune.train.freeze import apply_freeze
    from mixtune.train.lora import apply_lora

    family, model, processor = load_model_and_processor(model_dir, "sdpa")
    if lora:
        torch.manual_seed(0)
        model = apply_lora(model, family, MixtuneArgs(lora=True, lora_dropout=0.0))
    else:
        apply_freeze(model, None, None, family, ("vision",))
    return family, model, processor


@pytest.mark.parametrize("name", ["qwen2_vl", "llava"])
@pytest.mark.parametrize("lora", [False, True])
def test_frozen_vision_tower_records_no_autograd_under_checkpointing(tiny_model_dir, tmp_path, name, lora):
    """transformers' checkpointing makes the vision tower's patch embedding output require grad; with the
    vision tower frozen mixtune drops that, and the losses and gradients stay the same."""
    from mixtune.train.recompute import keep_frozen_vision_out_of_autograd

    results = []
    for fixed in (False, True):
        family, model, processor = frozen_vision_model(name, tiny_model_dir(name), lora)
        if fixed:
            keep_frozen_vision_out_of_autograd(model, family)
        model.activation_checkpointing_enable()
        model.train()
        batch = PadCollator(processor.tokenizer.pad_token_id, family.collate_media)(
            uneven_samples(tmp_path, processor, family))
        seen, handles = vision_grad_outputs(model, family)
        out, grads = loss_and_grads(model, batch)
        for h in handles:
            h.remove()
        results.append((out, grads, sum(seen), len(seen)))
    (ref, ref_grads, before, n), (got, grads, after, _) = results
    assert n > 5 and before > n // 2  # transformers' own behaviour: the frozen tower in autograd
    assert after == 0
    assert_same(ref, ref_grads, got, grads)


@pytest.mark.parametrize("name", ["qwen2_vl", "llava"])
@pytest.mark.parametrize("lora", [False, True])
def test_vision_checkpointing_changes_no_loss_or_gradient(tiny_model_dir, tmp_path, name, lora):
    from mixtune.config import MixtuneArgs
    from mixtune.train.lora import apply_lora
    from mixtune.train.recompute import set_part_checkpointing

    family, model, processor = load_model_and_processor(tiny_model_dir(name), "sdpa")
    if lora:  # adapters on the vision tower too, so its checkpointed blocks have something to train
        torch.manual_seed(0)
        model = apply_lora(model, family, MixtuneArgs(lora=True, lora_dropout=0.0, lora_target_modules="all-linear"))
    model.train()
    for module in model.modules():  # no dropout, so the recomputed forward is the same
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batch = PadCollator(processor.tokenizer.pad_token_id, family.collate_media)(
        uneven_samples(tmp_path, processor, family))
    ref, ref_grads = loss_and_grads(model, batch)
    calls = []
    for parts in ({"vision": True, "language": False}, {"vision": True, "language": True},
                  {"vision": False, "language": True}):
        on = set_part_checkpointing(model, family, **parts)
        on_vision = [n for n in on if n.startswith(family.vision[0].rstrip(".*"))]
        assert bool(on_vision) == parts["vision"] and (len(on) > len(on_vision)) == parts["language"]
        wrapped = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)
                   and m.__class__.__name__.endswith(("Block", "Layer"))]
        hooks = [m._gradient_checkpointing_func for m in wrapped]
        assert hooks
        counter = []
        for m in wrapped:
            f = m._gradient_checkpointing_func
            m._gradient_checkpointing_func = (lambda f: lambda *a, **k: (counter.append(1), f(*a, **k))[1])(f)
        got, grads = loss_and_grads(model, batch)
        for m, f in zip(wrapped, hooks):
            m._gradient_checkpointing_func = f
        calls.append(len(counter))
        assert_same(ref, ref_grads, got, grads)
    assert all(c > 0 for c in calls)
    assert calls[1] == calls[0] + calls[2]  # vision blocks + language layers: each part checkpoints its own


def test_recompute_vision_false_checkpoints_only_the_language_model_in_training(tiny_model_dir, tmp_path):
    from mixtune.train.run import build_trainer

    Image.new("RGB", (112, 112), (220, 30, 30)).save(tmp_path / "sq.png")
    records = [{"image": "sq.png", "conversations": [["<image>What colour is the shape?", "red"]]}] * 4
    data = write_json(tmp_path / "data.json", records)
    trainer = build_trainer(load_config(write_config(tmp_path, tiny_model_dir("qwen2_vl"), data, max_steps=1,
                                                     lora=True, recompute=True, recompute_vision=False)))
    trainer.train()
    base = trainer.model.get_base_model()
    flags = {n: m.gradient_checkpointing for n, m in base.named_modules() if hasattr(m, "gradient_checkpointing")}
    vision = {n: f for n, f in flags.items() if n.startswith("model.visual")}
    language = {n: f for n, f in flags.items() if n.startswith("model.language_model")}
    assert vision and not any(vision.values())
    assert language and all(language.values())
    # LoRA leaves the vision tower frozen: it records no autograd although checkpointing is on
    from mixtune.models.registry import get_family

    seen, handles = vision_grad_outputs(trainer.model, get_family("qwen2_vl"))
    trainer.model.train()
    trainer.model(**trainer.data_collator([trainer.train_dataset[i] for i in range(2)])).loss.backward()
    for h in handles:
        h.remove()
    assert seen and not any(seen)


# ---- the GPU benchmarks' CPU smoke runs ----

def run_benchmark(name: str, argv: list[str], monkeypatch, capsys) -> list[dict]:
    import importlib
    import json
    import sys

    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parents[1] / "benchmarks"))
    module = importlib.import_module(name)
    monkeypatch.setattr(sys, "argv", [name] + argv)
    module.main()
    return [json.loads(line[len("RESULT "):]) for line in capsys.readouterr().out.splitlines()
            if line.startswith("RESULT ")]


def test_gpu_throughput_runs_tiny_on_the_cpu(monkeypatch, capsys):
    """Every setting prints one RESULT line: the CPU ones with figures, over the same samples padded and packed;
    the GPU-only ones saying why they were skipped."""
    settings = ["padded", "mixtoken_mask", "mixtoken_packed", "mixtoken_varlen", "mixtoken_flash", "padded+liger"]
    results = run_benchmark("gpu_throughput", ["--tiny", "--settings", ",".join(settings), "--steps", "1",
                                               "--warmup", "1", "--samples", "24", "--max_length", "512"],
                            monkeypatch, capsys)
    by = {r["setting"]: r for r in results}
    assert sorted(by) == sorted(settings) and len(results) == len(settings)
    ran = [by[s] for s in ("padded", "mixtoken_mask", "mixtoken_packed")]
    for r in ran:
        assert r["tokens_per_s"] > 0 and r["tflops_per_s"] > 0 and r["mfu"] is None  # no known peak on a CPU
    assert len({r["tokens_per_step"] for r in ran}) == 1  # the same samples in every setting
    assert by["padded"]["batch_shape"][0] > by["mixtoken_packed"]["batch_shape"][0]
    assert "CUDA" in by["mixtoken_varlen"]["skipped"] and "CUDA" in by["padded+liger"]["skipped"]
    assert "flash-attn" in by["mixtoken_flash"]["skipped"] or "CUDA" in by["mixtoken_flash"]["skipped"]


def test_memory_benchmark_shows_what_lora_saves(monkeypatch, tmp_path):
    """memory.py's measuring step, in this process: LoRA trains a fraction of the weights and its optimizer
    state is a fraction of full SFT's; the weights held are the same model's."""
    import sys
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parents[1] / "benchmarks"))
    import memory

    model_dir, data = memory.prepare(str(tmp_path), "tiny", 0)
    args = SimpleNamespace(tiny=True, batch_size=2, steps=1, recompute=False, threads=1, seed=0)
    full = memory.run_mode("full", model_dir, data, str(tmp_path), args)
    lora = memory.run_mode("lora", model_dir, data, str(tmp_path), args)
    assert lora["trainable_params"] * 10 < full["trainable_params"]
    assert lora["optimizer_mib"] * 10 < full["optimizer_mib"] and lora["grads_mib"] * 10 < full["grads_mib"]
    assert full["optimizer_mib"] == pytest.approx(2 * full["grads_mib"], rel=0.01)  # AdamW: two fp32 moments
    assert lora["weights_mib"] >= full["weights_mib"]  # the base is all there, plus the adapters
    assert sys.modules["memory"] is memory
