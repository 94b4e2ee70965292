"""Kill a run at its writes (inside checkpoint saves, the final save, the lock), then resume: every resume
continues from the newest complete checkpoint with the uninterrupted run's losses and weights, or says clearly
that there is none. No half-written checkpoint or final model ever sits in output_dir looking complete."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import crashkit
from conftest import red_image, write_config, write_json
from mixtune.config import load_config
from mixtune.errors import ConfigError
from mixtune.train.checkpoints import MARKER, STAGING
from mixtune.train.lock import LOCK_NAME
from mixtune.train.run import train

STEPS = dict(max_steps=6, save_strategy="steps", save_steps=2, lr_scheduler_type="linear", learning_rate=1e-3,
             per_device_train_batch_size=2)


def crash_data(tmp_path):
    img = red_image(tmp_path / "red.png")
    records = [{"image": img, "conversations": [["<image>What colour is the shape?", f"red {i}"]]} for i in range(16)]
    return write_json(tmp_path / "train.json", records)


def config_file(tmp_path, model, data, out, **overrides):
    return write_config(tmp_path, model, data, output_dir=str(out), **{**STEPS, **overrides})


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


class Reference:
    """The uninterrupted run: per-step losses, final weights, and every checkpoint's bytes."""

    def __init__(self, out):
        history = json.load(open(os.path.join(out, "metrics.json")))["log_history"]
        self.losses = {h["step"]: h["loss"] for h in history if "loss" in h}
        self.weights = load_file(os.path.join(out, "model.safetensors"))
        self.checkpoints = {}
        for name in os.listdir(out):
            if name.startswith("checkpoint-"):
                folder = os.path.join(out, name)
                self.checkpoints[int(name.split("-")[1])] = {  # training_args.bin holds output_dir: compared by size
                    f: read_bytes(os.path.join(folder, f)) for f in os.listdir(folder) if f != MARKER}

    def identical(self, folder, step) -> bool:
        """Byte for byte the uninterrupted run's checkpoint: an oracle that does not trust mixtune's marker."""
        files = self.checkpoints.get(step, {})
        def same(f, b):
            path = os.path.join(folder, f)
            if f == "training_args.bin":
                return os.path.isfile(path) and abs(os.path.getsize(path) - len(b)) < 200
            return os.path.isfile(path) and read_bytes(path) == b
        return bool(files) and all(same(f, b) for f, b in files.items())


def expected_resume(out, ref) -> int | None:
    """After a kill: assert nothing half-written sits in place; return the step a resume must continue from."""
    steps = []
    if not os.path.isdir(out):  # killed before the folder existed
        return None
    for name in os.listdir(out):
        if name.startswith("checkpoint-"):
            step = int(name.split("-")[1])
            assert ref.identical(os.path.join(out, name), step), f"{name} is in place but not complete"
            steps.append(step)
    staging = os.path.join(out, STAGING)
    for name in os.listdir(staging) if os.path.isdir(staging) else []:
        folder = os.path.join(staging, name)  # marked complete, killed before its rename: recovered at the start
        if name.startswith("checkpoint-") and os.path.exists(os.path.join(folder, MARKER)) and not os.path.exists(
                os.path.join(out, name)):
            assert ref.identical(folder, int(name.split("-")[1])), f"{name} is marked complete but is not"
            steps.append(int(name.split("-")[1]))
    if os.path.exists(os.path.join(out, "config.json")):  # a final model that loads must be the whole new one
        got = load_file(os.path.join(out, "model.safetensors"))
        assert all(torch.equal(got[k], ref.weights[k]) for k in ref.weights), "final config.json beside other weights"
    return max(steps) if steps else None


def assert_same_run(out, ref):
    history = json.load(open(os.path.join(out, "metrics.json")))["log_history"]
    losses = {h["step"]: h["loss"] for h in history if "loss" in h}
    assert sorted(losses) == sorted(ref.losses)
    for step, loss in ref.losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step
    weights = load_file(os.path.join(out, "model.safetensors"))
    for key, value in ref.weights.items():
        assert torch.allclose(weights[key], value, atol=1e-6, rtol=0), key
    assert os.path.exists(os.path.join(out, MARKER))


def kill_points(events) -> list[int]:
    """Event numbers (1-based) worth killing at: repeated mkdirs of an existing folder change nothing."""
    seen, points = set(), []
    for i, (kind, path) in enumerate(events, 1):
        if kind == "os.mkdir" and path in seen:
            continue
        seen.add(path) if kind == "os.mkdir" else None
        points.append(i)
    return points


@pytest.fixture
def crash_setup(tiny_model_dir, tmp_path):
    model, data = tiny_model_dir("qwen2_vl"), crash_data(tmp_path)
    crashkit.arm(str(tmp_path / "ref"), 0, "raise")  # counts the uninterrupted run's writes
    train(load_config(config_file(tmp_path, model, data, tmp_path / "ref")))
    events = [(kind, os.path.relpath(path, tmp_path / "ref")) for kind, path in crashkit.disarm()]
    return model, data, Reference(str(tmp_path / "ref")), events


def pick(events, kind, path, last=False):
    """The number of the first (or last) event of that kind on that path (a suffix of it) in output_dir."""
    found = [i for i, (k, p) in enumerate(events, 1) if k.endswith(kind) and p.endswith(path)]
    return found[-1] if last else found[0]


def test_kills_inside_saves_resume_from_newest_complete_checkpoint(crash_setup, tmp_path, caplog):
    model, data, ref, events = crash_setup
    points = {  # one kill in each kind of moment; the slow test below kills at every write
        "before any checkpoint": pick(events, "open-write", ".mixtune.lock"),
        "optimizer.pt of checkpoint-4 half written": pick(events, "save", "checkpoint-4/optimizer.pt"),
        "checkpoint-4 marked, not yet renamed": pick(events, "rename", f"{STAGING}/checkpoint-4"),
        "final weights half written": pick(events, "save_file", "final/model.safetensors"),
        "final config.json not yet moved in": pick(events, "rename", "final/config.json"),
        "final marker not yet written": pick(events, "open-write", f"{MARKER}.tmp", last=True),
    }
    results = {}
    for what, k in points.items():
        out = tmp_path / f"kill{k}"
        crashkit.arm(str(out), k, "raise")
        with pytest.raises(crashkit.Killed):
            train(load_config(config_file(tmp_path, model, data, out)))
        crashkit.disarm()
        expected = expected_resume(str(out), ref)
        resume_cfg = load_config(config_file(tmp_path, model, data, out, resume_from_checkpoint=True))
        caplog.clear()
        if expected is None:
            with pytest.raises(ConfigError, match="no complete checkpoint"):
                train(resume_cfg)
        else:
            with caplog.at_level(logging.INFO, logger="mixtune"):
                train(resume_cfg)
            assert f"resuming from {out / f'checkpoint-{expected}'}" in caplog.text, what
            assert_same_run(str(out), ref)
        results[what] = expected
    assert results == {"before any checkpoint": None, "optimizer.pt of checkpoint-4 half written": 2,
                       "checkpoint-4 marked, not yet renamed": 4, "final weights half written": 6,
                       "final config.json not yet moved in": 6, "final marker not yet written": 6}


def run_cli(args, env_extra=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    here = os.path.dirname(__file__)
    env["PYTHONPATH"] = here + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.slow
def test_kill_9_at_every_write_then_resume(crash_setup, tmp_path):
    """A real process killed (os._exit(9)) at each of its writes into output_dir, then `mixtune train
    --resume_from_checkpoint true` in a new process. Prints the figures."""
    model, data, ref, events = crash_setup
    kit = os.path.join(os.path.dirname(__file__), "crashkit.py")
    tally = {"kill points": 0, "resumed with identical losses and weights": 0, "said there is no checkpoint": 0}
    for k in kill_points(events):
        out = tmp_path / f"kill{k}"
        cfg = config_file(tmp_path, model, data, out)
        killed = run_cli([kit, str(k), str(tmp_path / "events.jsonl"), str(out), "--", "train", cfg])
        assert killed.returncode == 9, (k, events[k - 1], killed.stderr[-2000:])
        expected = expected_resume(str(out), ref)
        resumed = run_cli(["-m", "mixtune", "train", cfg, "--resume_from_checkpoint", "true"])
        assert "Traceback" not in resumed.stderr, (k, events[k - 1], resumed.stderr[-3000:])
        if expected is None:
            assert resumed.returncode == 2 and "no complete checkpoint" in resumed.stderr, (k, resumed.stderr[-2000:])
            tally["said there is no checkpoint"] += 1
        else:
            assert resumed.returncode == 0, (k, events[k - 1], resumed.stderr[-3000:])
            assert f"resuming from {out / f'checkpoint-{expected}'}" in resumed.stderr, (k, events[k - 1])
            assert_same_run(str(out), ref)
            tally["resumed with identical losses and weights"] += 1
        tally["kill points"] += 1
        where = "in checkpoint saves" if "checkpoint-" in events[k - 1][1] else \
            "at the start (lock, staging)" if events[k - 1][1] in (".", LOCK_NAME, STAGING) else "in the final save"
        tally[where] = tally.get(where, 0) + 1
    print("RESULT kill-9 test:", json.dumps(tally))
    assert tally["kill points"] == tally["resumed with identical losses and weights"] + tally[
        "said there is no checkpoint"]


def test_final_save_into_a_reused_folder_never_mixes_old_and_new(tmp_path):
    """Kill the final save's commit at each of its writes into a folder holding an earlier final model: a
    folder with a config.json holds only the new files or only the old ones, never a mix."""
    from mixtune.train.outdir import commit_final, mark_final_complete

    def fill(folder, tag, extra=()):
        os.makedirs(folder, exist_ok=True)
        for name in ("config.json", "model.safetensors", "tokenizer.json", *extra):
            (folder / name).write_text(f"{tag} {name}")

    points, k = 0, 1
    while True:
        out = tmp_path / f"out{k}"
        fill(out, "old", extra=("metrics.json", "model-00002-of-00002.safetensors"))
        mark_final_complete(str(out), os.listdir(out))
        (out / f"{MARKER}.tmp").write_text("old stray")  # a kill while the old marker was being written
        (out / "checkpoint-2").mkdir()
        staged = out / STAGING / "final"
        fill(staged, "new")
        crashkit.arm(str(out), k, "raise")
        try:
            commit_final(str(staged), str(out))
            done = True
        except crashkit.Killed:
            done = False
        crashkit.disarm()
        tags = {n: (out / n).read_text().split()[0] for n in os.listdir(out) if os.path.isfile(out / n)
                and n != MARKER}
        if (out / "config.json").exists():
            assert len(set(tags.values())) == 1, (k, tags)  # all old (untouched) or all new
        if (out / MARKER).exists():
            assert set(tags.values()) == {"old"} and len(tags) == 6, (k, tags)  # only the untouched old folder
        assert (out / "checkpoint-2").is_dir()
        points += 1
        if done:
            assert tags == {"config.json": "new", "model.safetensors": "new", "tokenizer.json": "new"}, tags
            break
        k += 1
    assert points > 8
