"""Qwen-VL (`model_type` "qwen") as a native port; importing this registers it with transformers' Auto classes,
so `AutoModelForCausalLM` / `AutoProcessor` / `AutoTokenizer.from_pretrained(folder)` load a published
Qwen-VL folder without `trust_remote_code`."""

from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor,
                          AutoTokenizer)

from mixtune.native.qwen_vl.configuration_qwen import QWenConfig
from mixtune.native.qwen_vl.modeling_qwen import QWenLMHeadModel, QWenModel
from mixtune.native.qwen_vl.processing_qwen_vl import QWenVLProcessor
from mixtune.native.qwen_vl.tokenization_qwen import QWenTokenizer

__all__ = ["QWenConfig", "QWenLMHeadModel", "QWenModel", "QWenTokenizer", "QWenVLProcessor"]


def _register() -> None:
    for register in (lambda: AutoConfig.register("qwen", QWenConfig),
                     lambda: AutoModelForCausalLM.register(QWenConfig, QWenLMHeadModel),
                     lambda: AutoModelForImageTextToText.register(QWenConfig, QWenLMHeadModel),
                     lambda: AutoTokenizer.register(QWenConfig, fast_tokenizer_class=QWenTokenizer),
                     lambda: AutoProcessor.register(QWenConfig, QWenVLProcessor)):
        try:
            register()
        except ValueError:  # already registered (a re-import)
            pass


_register()
