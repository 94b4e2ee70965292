"""The demo really learns: held-out accuracy before and after (slow: minutes each; `pytest -m slow`)."""

import pytest

from mixtune.tools.demo import run_demo


@pytest.mark.slow
@pytest.mark.parametrize("family,mixtoken", [("qwen2_vl", False), ("llava", False), ("internvl", False),
                                             ("cogvlm", False), ("qwen2_vl", True), ("internvl_chat", False),
                                             ("qwen_vl", False)])
def test_demo_learns(tmp_path, family, mixtoken):
    report = run_demo(family, str(tmp_path / "demo"), mixtoken=mixtoken)
    assert report["accuracy_before"] < report["chance_accuracy"]
    assert report["accuracy_after"] >= 0.9
    assert report["train_loss_last"] < 0.1 * report["train_loss_first"]


@pytest.mark.slow
def test_video_demo_needs_the_frames(tmp_path):
    from mixtune.tools.video_demo import run_video_demo

    report = run_video_demo("qwen2_vl", str(tmp_path / "demo"))
    assert report["accuracy_after"] >= 0.9
    assert report["first_frame_accuracy_after"] <= 0.45  # one frame carries no direction: near chance (0.25)


@pytest.mark.parametrize("task", ["contrastive", "classification", "dpo", "grpo", "segmentation", "detection",
                                  "text_to_audio"])
def test_demo_task_reaches_its_own_demo(task, monkeypatch, capsys):
    # the CLI's table sends each --task to its demo with the right arguments (the demos themselves are slow tests)
    import importlib

    from mixtune.cli import TASK_DEMOS, main

    demo = TASK_DEMOS[task]
    calls = []
    monkeypatch.setattr(importlib.import_module(f"mixtune.tools.{demo.module}"), demo.function,
                        lambda *args: calls.append(args) or {"ran": demo.function})
    assert main(["demo", "--task", task, "--learning_rate", "0.5"]) == 0
    expected_dir = demo.own_dir or "runs/demo"
    assert calls == [((task,) if demo.takes_task else ()) + (expected_dir, {"learning_rate": 0.5})]
    assert main(["demo", "--task", task, "--output_dir", "elsewhere"]) == 0
    assert calls[-1][-2] == "elsewhere"


@pytest.mark.slow
def test_segmentation_demo_reaches_its_miou(tmp_path):
    from mixtune.tools.seg_demo import run_segmentation_demo

    report = run_segmentation_demo(str(tmp_path / "demo"))
    assert report["before"] < 0.2
    assert report["after"] >= 0.8  # filling each prompt box scores 0.71 on these shapes
    assert report["pictures"] and all(p.endswith(".png") for p in report["pictures"])
