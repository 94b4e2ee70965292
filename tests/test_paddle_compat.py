"""PaddleMIX / PaddleNLP keys read in mixtune's terms, and the PaddleMIX module-name tables."""

import os

import pytest
import torch

from mixtune.config import build_config
from mixtune.errors import ConfigError
from mixtune.paddle_compat import PADDLE_NAMES, translate_pattern, tied_aliases

# reading a config checks that data files exist (this file does)
HERE = os.path.abspath(__file__)
BASE = {"model_name_or_path": "some/model", "dataset": {"train": [{"name": "chatml_dataset", "data_files": HERE}]}}


def build(**kw):
    return build_config({**BASE, **kw})


def lr_curve(cfg, steps=100, warmup=10):
    from transformers.optimization import get_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=cfg.training.learning_rate)
    sched = get_scheduler(cfg.training.lr_scheduler_type, opt, num_warmup_steps=warmup, num_training_steps=steps,
                          scheduler_specific_kwargs=cfg.training.lr_scheduler_kwargs)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_blip2_schedule_keys_are_a_cosine_with_floor_and_warmup_start():
    cfg = build(learning_rate=1e-3, eta_min=1e-5, warmup_start_lr=1e-6, lr_scheduler_name="CosineDecayWithWarmup")
    assert cfg.training.lr_scheduler_type == "cosine_warmup_with_min_lr"
    assert cfg.training.lr_scheduler_kwargs == {"min_lr": 1e-5, "warmup_lr_rate": pytest.approx(1e-3)}
    lrs = lr_curve(cfg)
    assert lrs[0] == pytest.approx(1e-6)  # the warm-up starts at warmup_start_lr
    assert max(lrs) == pytest.approx(1e-3)
    assert min(lrs[10:]) >= 1e-5 - 1e-12 and lrs[-1] == pytest.approx(1e-5, rel=0.05)  # the floor is eta_min
    assert any("CosineDecayWithWarmup" in n for n in cfg.notes)


def test_lr_scheduler_name_alone_takes_paddlemix_defaults():
    cfg = build(learning_rate=1e-3, lr_scheduler_name="CosineDecayWithWarmup")
    assert cfg.training.lr_scheduler_kwargs == {"min_lr": 1e-5, "warmup_lr_rate": pytest.approx(1e-3)}


def test_eta_min_alone_floors_a_cosine():
    cfg = build(learning_rate=1e-3, lr_scheduler_type="cosine", eta_min=1e-4)
    assert cfg.training.lr_scheduler_type == "cosine_with_min_lr"
    assert lr_curve(cfg)[-1] == pytest.approx(1e-4, rel=0.05)


@pytest.mark.parametrize("kw,match", [
    ({"lr_scheduler_name": "LinearDecay"}, "PaddleMIX scheduler 'LinearDecay' has no equivalent"),
    ({"eta_min": 1e-5, "lr_scheduler_type": "linear"}, "lr_scheduler_type is 'linear'"),
    ({"eta_min": -1.0}, "'eta_min': expected a number >= 0"),
    ({"eta_min": 1e-5, "lr_scheduler_kwargs": {"min_lr": 0.1}}, "sets the floor already"),
])
def test_schedule_keys_without_a_meaning_here_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        build(**kw)


@pytest.mark.parametrize("key,value", [("text_model_name_or_path", "facebook/opt-2.7b"), ("src_length", 1024)])
def test_keys_paddlemix_has_no_use_for_here_are_logged(key, value):
    cfg = build(**{key: value})
    assert any(n.startswith(f"'{key}' has no effect") for n in cfg.notes)


def test_mm_projector_lr_is_a_key_not_a_typo():
    cfg = build(mm_projector_lr=2e-5)
    assert cfg.mix.projector_lr == 2e-5
    with pytest.raises(ConfigError, match="given together with its alias 'mm_projector_lr'"):
        build(mm_projector_lr=2e-5, projector_lr=1e-5)


def entry(**kw):
    return {"name": "coco_caption", "data_files": HERE, **kw}


def test_splits_label_agreeing_with_the_split_is_read_and_dropped():
    cfg = build(dataset={"train": [entry(splits="train")], "eval": [entry(splits=["val"])]})
    assert cfg.mix.dataset == {"train": [entry()], "eval": [entry()]}
    assert sum("'splits'" in n for n in cfg.notes) == 2


@pytest.mark.parametrize("dataset,match", [
    ({"train": [{"name": "coco_caption", "splits": "train"}]}, "download its built-in 'coco_caption' data"),
    ({"train": [entry()], "eval": [entry(splits="train")]}, r"'splits' \['train'\] disagree with .*dataset.eval"),
    ({"train": [entry(splits="val")]}, "disagree"),
    ({"train": [entry(data_files=["a.json", "b.json"], splits=["train"] * 3)]}, "3 'splits' for 2 data_files"),
])
def test_splits_that_cannot_hold_are_refused(dataset, match):
    with pytest.raises(ConfigError, match=match):
        build(dataset=dataset)


# ---- PaddleMIX module names, per family: (family, regex?, PaddleMIX pattern, what to write instead) ----
TRANSLATIONS = [
    ("qwen2_vl", False, "*visual.attn_pool*", ["*visual.merger*"]),
    ("qwen2_vl", True, ".*attn.c_attn.*", [".*self_attn.(q_proj|k_proj|v_proj).*"]),
    ("qwen2_vl", True, ".*mlp.c_proj.*", [".*mlp.down_proj.*"]),
    ("qwen2_vl", True, r"transformer.h.*.attn.c_proj", [r"model.language_model.layers.*.self_attn.o_proj"]),
    ("llava", False, "*llama*", ["*model*"]),
    ("llava", False, "*llama.mm_projector*", ["*model.multi_modal_projector*"]),
    ("llava", True, "llama.layer.*q_proj.*", ["model.language_model.layer.*q_proj.*"]),
    ("llava", False, "*vit*", ["*vision_tower*"]),
    ("llava", True, ".*attention.wqkv", [".*self_attn.(q_proj|k_proj|v_proj)"]),
    ("llava", False, "*lm_head*", ["model.language_model.embed_tokens.weight"]),  # tied in the tiny model
    ("internvl", False, "*mlp1*", ["*model.multi_modal_projector*"]),
    ("internvl", False, "vision_model.*", ["model.vision_tower.*"]),
    ("internvl", True, "language_model.model.layers.*.feed_forward.w2",
     ["model.language_model.layers.*.mlp.down_proj"]),
    ("blip-2", True, "language_model.opt.decoder.layers.*.self_attn.q_proj.*",
     ["language_model.model.decoder.layers.*.self_attn.q_proj.*"]),
    ("blip-2", False, "*visual_encoder*", ["*vision_model*"]),
    ("blip-2", False, "Qformer.*", ["qformer.*"]),
    ("blip-2", True, ".*query_key_value.*", [".*language_model.*self_attn.(q_proj|k_proj|v_proj).*"]),
    ("blip-2", True, ".*dense_4h_to_h", [".*language_model.*fc2"]),
]


@pytest.fixture(scope="module")
def tiny_names(tiny_model_dir):
    from mixtune.models.loading import load_model_and_processor

    cache = {}

    def get(family):
        if family not in cache:
            _, model, _ = load_model_and_processor(tiny_model_dir(family), None)
            cache[family] = ([n for n, _ in model.named_parameters()], [n for n, _ in model.named_modules() if n],
                             tied_aliases(model))
        return cache[family]
    return get


@pytest.mark.parametrize("family,regex,pattern,expected", TRANSLATIONS)
def test_paddlemix_names_translate_to_patterns_that_match(tiny_names, family, regex, pattern, expected):
    import re
    from fnmatch import fnmatch

    params, modules, aliases = tiny_names(family)
    names = modules if regex else params
    if regex:
        match = lambda p: any(re.fullmatch(p, n) for n in names)  # noqa: E731
    else:
        match = lambda p: any(fnmatch(n, p) for n in names)  # noqa: E731
    assert not match(pattern)  # the PaddleMIX pattern really misses in the transformers model
    new, _ = translate_pattern(pattern, names, PADDLE_NAMES[family], regex, aliases)
    assert new == expected
    assert all(match(p) for p in new)


def test_a_pattern_no_naming_explains_gets_no_translation(tiny_names):
    params, _, aliases = tiny_names("llava")
    assert translate_pattern("*no_such_module*", params, PADDLE_NAMES["llava"], False, aliases) is None


def test_freeze_error_keeps_its_text_and_adds_the_paste(tiny_model_dir, tmp_path):
    from conftest import red_image, write_config, write_json
    from mixtune.config import load_config
    from mixtune.train.run import build_trainer

    img = red_image(tmp_path / "red.png")
    data = write_json(tmp_path / "t.json", [{"image": img, "conversations": [["<image>Colour?", "red"]]}])
    cfg = load_config(write_config(tmp_path, tiny_model_dir("qwen2_vl"), data, freeze_include=["*visual*"],
                                   freeze_exclude=["*visual.attn_pool*"]))
    with pytest.raises(ConfigError) as err:
        build_trainer(cfg)
    message = str(err.value)
    assert message.startswith("config key 'freeze_exclude': glob '*visual.attn_pool*' matches no parameter")
    assert message.endswith('For this qwen2_vl model write:\n  "freeze_exclude": ["*visual.merger*"]')
    assert "Qwen-VL naming" in message
