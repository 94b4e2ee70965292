"""The demo really learns: held-out accuracy before and after (slow: minutes each; `pytest -m slow`)."""

import pytest

from mixtune.tools.demo import run_demo


@pytest.mark.slow
@pytest.mark.parametrize("family,mixtoken", [("qwen2_vl", False), ("llava", False), ("internvl", False),
                                             ("qwen2_vl", True)])
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
