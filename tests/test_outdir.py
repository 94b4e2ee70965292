"""The output folder's guarantees: one run at a time (lock), overwrite starts fresh, resume never takes a
half-written checkpoint, a full disk is one clear error, and LoRA runs are reproducible from `seed`."""

import errno
import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_config
from mixtune.cli import main
from mixtune.config import load_config
from mixtune.train.checkpoints import MARKER, STAGING, incomplete_reason
from mixtune.train.lock import LOCK_NAME, OutputLock
from mixtune.train.run import train
from test_crash import STEPS, crash_data

FAST = dict(STEPS, max_steps=4)


def losses(out) -> dict:
    history = json.load(open(os.path.join(out, "metrics.json")))["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.fixture
def run(tiny_model_dir, tmp_path):
    """run(out, **overrides) trains the tiny Qwen2-VL for 4 steps (checkpoints at 2 and 4) into `out`."""
    model, data = tiny_model_dir("qwen2_vl"), crash_data(tmp_path)

    def go(out, cli=False, **overrides):
        cfg = write_config(tmp_path, model, data, output_dir=str(out), **{**FAST, **overrides})
        return main(["train", cfg]) if cli else train(load_config(cfg))
    return go


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    cfg = write_config(tmp, tiny_model_dir("qwen2_vl"), crash_data(tmp), output_dir=str(tmp / "out"), **FAST)
    train(load_config(cfg))
    return str(tmp / "out")


# --- the lock ---------------------------------------------------------------------------------------------------

def test_second_run_on_a_folder_in_use_is_refused(run, tmp_path, capsys):
    out = tmp_path / "out"
    with OutputLock(str(out)):  # another run holds the folder (flock is per open file, so this counts)
        assert run(out, cli=True) == 2
    err = capsys.readouterr().err
    assert f"output_dir {out} is in use by another mixtune run (pid {os.getpid()} on host {socket.gethostname()}" \
        in err and "Traceback" not in err
    assert not os.path.exists(out / LOCK_NAME)  # the holder released it
    assert run(out, cli=True) == 0 and not os.path.exists(out / LOCK_NAME)  # released at the end of the run


def test_lock_is_released_when_the_run_fails(run, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Exception, match="no complete checkpoint"):
        run(out, resume_from_checkpoint=True)
    assert not os.path.exists(out / LOCK_NAME)


def test_stale_lock_of_a_dead_process_is_taken_over(run, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "earlier"}))
    with caplog.at_level(logging.WARNING, logger="mixtune"):
        run(out, save_strategy="no", max_steps=1)
    assert f"taking over the stale lock {out / LOCK_NAME} left by pid {dead.pid}" in caplog.text
    assert "no longer running" in caplog.text
    assert os.path.exists(out / MARKER)


def test_lock_left_by_another_host_is_refused_with_how_to_clear_it(run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "gpu-node-7", "started": "earlier"}))
    assert run(out, cli=True) == 2
    err = capsys.readouterr().err
    assert "pid 1 on host gpu-node-7" in err and f"delete {out / LOCK_NAME}" in err
    assert os.path.exists(out / LOCK_NAME)  # not ours to delete


def test_a_lock_held_by_a_live_process_refuses(run, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
sys.path.insert(0, {os.path.join(os.path.dirname(__file__), '..', 'src')!r})
from mixtune.train.lock import OutputLock
with OutputLock({str(out)!r}):
    print("held", flush=True)
    time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run(out, cli=True) == 2
        assert f"in use by another mixtune run (pid {holder.pid} on host" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert run(out, cli=True) == 0  # killed holder: its flock died with it; the leftover file does not block


# --- overwrite_output_dir ---------------------------------------------------------------------------------------

def test_overwrite_starts_fresh_and_never_resumes_the_old_run(run, tmp_path, caplog):
    out = tmp_path / "out"
    run(out)  # the previous run: checkpoint-2, checkpoint-4, final model, metrics
    (out / "notes.txt").write_text("mine")
    with caplog.at_level(logging.INFO, logger="mixtune"):
        run(out, overwrite_output_dir=True, save_strategy="no", max_steps=1)
    assert not any(n.startswith("checkpoint-") for n in os.listdir(out))
    assert "deleted the previous run's checkpoint-2, checkpoint-4" in caplog.text
    assert "left in place (not written by mixtune): notes.txt" in caplog.text
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(losses(out)) == [1]  # the metrics are this run's only
    with pytest.raises(Exception, match="no complete checkpoint-\\* folder"):  # nothing of the old run to resume
        run(out, resume_from_checkpoint=True)


def test_overwrite_and_resume_together_are_refused(run, tmp_path, capsys):
    assert run(tmp_path / "out", cli=True, overwrite_output_dir=True, resume_from_checkpoint=True) == 2
    assert "set only one" in capsys.readouterr().err


# --- resume skips what is incomplete ----------------------------------------------------------------------------

def test_resume_takes_the_newest_complete_checkpoint_and_says_what_it_skipped(run, reference, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(os.path.join(reference, "checkpoint-2"), out / "checkpoint-2")
    shutil.copytree(os.path.join(reference, "checkpoint-4"), out / "checkpoint-4")
    os.truncate(out / "checkpoint-4" / "optimizer.pt", 1000)  # e.g. copied by hand, half-way
    legacy = out / "checkpoint-6"  # an older mixtune's save, killed while writing trainer_state.json
    shutil.copytree(os.path.join(reference, "checkpoint-4"), legacy)
    os.remove(legacy / MARKER)
    (legacy / "trainer_state.json").write_text("")
    with caplog.at_level(logging.INFO, logger="mixtune"):
        run(out, resume_from_checkpoint=True, save_total_limit=1)
    assert f"not resuming from {legacy}: trainer_state.json is empty or cut short" in caplog.text
    assert f"not resuming from {out / 'checkpoint-4'}: optimizer.pt has 1000 bytes" in caplog.text
    assert f"resuming from {out / 'checkpoint-2'}, the newest complete checkpoint" in caplog.text
    ref = losses(reference)
    assert losses(out) == pytest.approx(ref, rel=1e-5)
    # save_total_limit 1: the new checkpoint-4 is kept although a partial checkpoint-6 has a higher step
    assert incomplete_reason(str(out / "checkpoint-4")) is None and not os.path.exists(out / "checkpoint-2")


def test_explicit_resume_from_an_incomplete_checkpoint_is_a_clear_error(run, reference, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(os.path.join(reference, "checkpoint-2"), out / "checkpoint-2")
    os.remove(out / "checkpoint-2" / "model.safetensors")
    assert run(out, cli=True, resume_from_checkpoint=str(out / "checkpoint-2")) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {out / 'checkpoint-2'} is incomplete (model.safetensors is missing)" in err
    assert "Traceback" not in err


def test_checkpoint_of_an_older_mixtune_without_marker_is_accepted(run, reference, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(os.path.join(reference, "checkpoint-2"), out / "checkpoint-2")
    os.remove(out / "checkpoint-2" / MARKER)
    with caplog.at_level(logging.INFO, logger="mixtune"):
        run(out, resume_from_checkpoint=True)
    assert "saved without mixtune_complete.json (an older mixtune); accepted" in caplog.text
    assert losses(out) == pytest.approx(losses(reference), rel=1e-5)


# --- a full disk --------------------------------------------------------------------------------------------------

def full_disk_at(monkeypatch, module, name, when):
    original = getattr(module, name)

    def failing(obj, path, *args, **kwargs):
        if when(str(path)):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(obj, path, *args, **kwargs)
    monkeypatch.setattr(module, name, failing)


def test_full_disk_during_a_checkpoint_is_one_clear_error_and_the_last_one_resumes(
        run, reference, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    full_disk_at(monkeypatch, torch, "save", lambda p: "checkpoint-4" in p and p.endswith("optimizer.pt"))
    assert run(out, cli=True) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([line for line in err.splitlines() if "mixtune: error" in line]) == 1
    assert (f"could not write the optimizer and scheduler state to {out / STAGING / 'checkpoint-4' / 'optimizer.pt'}:"
            f" No space left on device [errno 28]; the last complete checkpoint, {out / 'checkpoint-2'}, is intact")\
        in err
    assert incomplete_reason(str(out / "checkpoint-2")) is None and not os.path.exists(out / "checkpoint-4")
    assert not os.path.exists(out / STAGING / "checkpoint-4") and not os.path.exists(out / LOCK_NAME)
    monkeypatch.undo()
    run(out, resume_from_checkpoint=True)
    assert losses(out) == pytest.approx(losses(reference), rel=1e-5)


def test_full_disk_during_the_final_save_keeps_the_previous_model_whole(run, tmp_path, capsys, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    out = tmp_path / "out"
    run(out, max_steps=2)  # an earlier, finished run in the same folder, continued below for 4 steps
    old = load_file(out / "model.safetensors")
    full_disk_at(monkeypatch, modeling_utils, "safe_save_file", lambda p: f"{STAGING}/final" in p)
    assert run(out, cli=True, resume_from_checkpoint=True) == 2
    err = capsys.readouterr().err
    assert "could not write the model weights, config and processor" in err and "No space left" in err
    assert f"the last complete checkpoint, {out / 'checkpoint-4'}, is intact" in err
    now = load_file(out / "model.safetensors")  # the earlier run's final model, whole and still marked complete
    assert all(torch.equal(now[k], old[k]) for k in old) and os.path.exists(out / MARKER)
    assert incomplete_reason(str(out / "checkpoint-4")) is None


def test_torch_style_write_error_on_a_full_disk_is_recognised(run, tmp_path, capsys, monkeypatch):
    """torch.save reports a full disk as a RuntimeError ('file write failed'): recognised by the free space."""
    out = tmp_path / "out"
    original = torch.save

    def failing(obj, path, *args, **kwargs):
        if str(path).endswith("rng_state.pth"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")
        return original(obj, path, *args, **kwargs)
    monkeypatch.setattr(torch, "save", failing)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 4096))
    assert run(out, cli=True) == 2
    err = capsys.readouterr().err
    assert "could not write the RNG state to" in err and "no complete checkpoint was saved yet" in err


# --- LoRA reproducibility -----------------------------------------------------------------------------------------

def test_lora_runs_with_the_same_seed_are_identical(run, tmp_path):
    outs = []
    for i, noise in enumerate((0, 12345)):
        torch.manual_seed(noise)  # whatever ran before in the process must not matter
        random.seed(noise)
        outs.append(tmp_path / f"lora{i}")
        run(outs[-1], lora=True, save_strategy="no", learning_rate=1e-2)
    assert losses(outs[0]) == losses(outs[1])
    a, b = (load_file(o / "adapter_model.safetensors") for o in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_A" in k)


def test_a_folder_in_use_with_checkpoints_is_refused_as_in_use(run, reference, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(reference, out)  # the other run has written checkpoints already
    with OutputLock(str(out)):
        assert run(out, cli=True) == 2
    err = capsys.readouterr().err
    assert "is in use by another mixtune run" in err and "not empty" not in err


def test_best_checkpoint_is_recorded_at_its_final_place(tiny_model_dir, tmp_path):
    """The stock save runs in the staging folder; the best checkpoint must be recorded where it ends up, so that
    load_best_model_at_end and save_total_limit find it."""
    data = crash_data(tmp_path)
    out = tmp_path / "out"
    cfg = write_config(tmp_path, tiny_model_dir("qwen2_vl"), data, output_dir=str(out),
                       dataset={"train": [{"name": "chatml_dataset", "data_files": data}],
                                "eval": [{"name": "chatml_dataset", "data_files": data}]},
                       **{**FAST, "eval_strategy": "steps", "eval_steps": 2, "load_best_model_at_end": True,
                          "metric_for_best_model": "eval_loss", "save_total_limit": 1})
    train(load_config(cfg))
    state = json.load(open(out / "checkpoint-4" / "trainer_state.json"))
    assert state["best_model_checkpoint"] == str(out / "checkpoint-4")  # the loss fell: step 4 is the best
    assert STAGING not in json.dumps(state)
