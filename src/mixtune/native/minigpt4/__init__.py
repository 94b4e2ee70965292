"""MiniGPT-4 (`model_type` "minigpt4", as PaddleMIX's config names it) as a native port; importing this
registers it with transformers' Auto classes, so `AutoModelForImageTextToText` / `AutoModelForCausalLM` /
`AutoProcessor.from_pretrained(folder)` load a MiniGPT-4 folder (`mixtune convert --from minigpt4` builds one
from the released pieces)."""

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from mixtune.native.minigpt4.configuration_minigpt4 import IMAGE_TOKEN, MiniGPT4Config
from mixtune.native.minigpt4.modeling_minigpt4 import MiniGPT4ForConditionalGeneration
from mixtune.native.minigpt4.processing_minigpt4 import MiniGPT4Processor

__all__ = ["IMAGE_TOKEN", "MiniGPT4Config", "MiniGPT4ForConditionalGeneration", "MiniGPT4Processor"]


def _register() -> None:
    for register in (lambda: AutoConfig.register("minigpt4", MiniGPT4Config),
                     lambda: AutoModelForCausalLM.register(MiniGPT4Config, MiniGPT4ForConditionalGeneration),
                     lambda: AutoModelForImageTextToText.register(MiniGPT4Config, MiniGPT4ForConditionalGeneration),
                     lambda: AutoProcessor.register(MiniGPT4Config, MiniGPT4Processor)):
        try:
            register()
        except ValueError:  # already registered (a re-import)
            pass


_register()
