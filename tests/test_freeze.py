import pytest
from transformers import AutoModelForImageTextToText

from mixtune.errors import ConfigError
from mixtune.train.freeze import apply_freeze, frozen_names


NAMES = ["model.visual.blocks.0.attn.qkv.weight", "model.visual.merger.mlp.0.weight",
         "model.language_model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]


def test_include_freezes_and_exclude_keeps_trainable():
    assert frozen_names(NAMES, ["*visual*"], None) == set(NAMES[:2])
    assert frozen_names(NAMES, ["*visual*"], ["*visual.merger*"]) == {NAMES[0]}
    assert frozen_names(NAMES, None, ["*visual*"]) == set()
    assert frozen_names(NAMES, ["model.*"], ["*language_model*"]) == set(NAMES[:2])


def test_glob_matching_nothing_is_an_error():
    with pytest.raises(ConfigError, match=r"freeze_include.*'\*vision_tower\*' matches no parameter"):
        frozen_names(NAMES, ["*vision_tower*"], None)


def test_apply_freeze_on_real_model_counts(tiny_model_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("qwen2_vl"))
    vision = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.visual."))
    merger = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.visual.merger."))
    total = sum(p.numel() for p in model.parameters())
    apply_freeze(model, ["model.visual.*"], ["model.visual.merger.*"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == total - vision + merger
