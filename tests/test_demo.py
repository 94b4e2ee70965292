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
