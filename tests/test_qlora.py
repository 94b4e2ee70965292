"""QLoRA up to the bitsandbytes kernel call (transformers quantises only on a GPU): which layers get quantised,
the config it builds, and the refusals when the config is read. The training run is benchmarks/qlora_gpu_check.py."""

from __future__ import annotations

import pytest
import torch

from conftest import write_config, write_json
from mixtune.config import load_config
from mixtune.errors import ConfigError
from mixtune.models.registry import get_family
from mixtune.train.qlora import Quantization, bnb_config, load_kwargs, skipped_modules

bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("name", ["qwen2_vl", "llava"])
@pytest.mark.parametrize("bits,layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_only_the_language_model_is_quantised(tiny_model_dir, name, bits, layer):
    from transformers.integrations import replace_with_bnb_linear

    from mixtune.models.loading import load_model_and_processor
    from mixtune.train.freeze import part_of

    family, model, _ = load_model_and_processor(tiny_model_dir(name))
    config = bnb_config(Quantization(bits), family)
    replace_with_bnb_linear(model, modules_to_not_convert=config.llm_int8_skip_modules, quantization_config=config)
    kinds = {n: type(m).__name__ for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) or type(m).__name__ == layer}
    quantised = {n for n, k in kinds.items() if k == layer}
    plain = set(kinds) - quantised
    assert quantised and all(part_of(f"{n}.weight", family) == "language" for n in quantised)
    assert {part_of(f"{n}.weight", family) for n in plain} >= {"vision", "projector"}
    assert "lm_head" in plain
    # every projection of every language-model layer is quantised
    layers = [n for n in kinds if ".language_model.layers." in n]
    assert layers and set(layers) <= quantised


def test_4bit_config_is_nf4_with_double_quantisation_and_the_training_dtype():
    family = get_family("qwen2_vl")
    config = bnb_config(Quantization("4bit", "fp4", torch.bfloat16), family)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "fp4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert skipped_modules(family) == ["lm_head", "model.visual", "model.visual.merger"]
    kwargs = load_kwargs(Quantization("4bit"), family)
    assert kwargs["device_map"] == {"": 0} and kwargs["quantization_config"].bnb_4bit_quant_type == "nf4"
    assert load_kwargs(None, family) == {}


@pytest.mark.parametrize("overrides,message", [
    ({"quantization": "4bit"}, "needs lora: true"),
    ({"quantization": "3bit", "lora": True}, "must be one of"),
    ({"quantization": "4bit", "lora": True, "quant_type": "int4"}, "quant_type.*must be one of"),
    pytest.param({"quantization": "4bit", "lora": True}, "needs a CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="refused only without a GPU")),
])
def test_config_refusals(tiny_model_dir, tmp_path, overrides, message):
    data = write_json(tmp_path / "d.json", [])
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, tiny_model_dir("qwen2_vl"), data, **overrides))
