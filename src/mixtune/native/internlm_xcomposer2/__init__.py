"""InternLM-XComposer2 (`model_type` "internlmxcomposer2") as a native port, built on mixtune's InternLM2
(mixtune.native.internlm2) with Partial LoRA projections; importing this registers it with transformers' Auto
classes, so `AutoModelForCausalLM` / `AutoProcessor` / `AutoTokenizer.from_pretrained(folder)` load a published
internlm-xcomposer2-7b folder without `trust_remote_code`."""

from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor,
                          AutoTokenizer)

from mixtune.native.internlm_xcomposer2.configuration_internlm_xcomposer2 import InternLMXComposer2Config
from mixtune.native.internlm_xcomposer2.modeling_internlm_xcomposer2 import (InternLMXComposer2ForCausalLM,
                                                                             InternLMXComposer2Model)
from mixtune.native.internlm_xcomposer2.plora import PLoRALinear
from mixtune.native.internlm_xcomposer2.processing_internlm_xcomposer2 import InternLMXComposer2Processor
from mixtune.native.internlm_xcomposer2.tokenization_internlm_xcomposer2 import InternLMXComposer2Tokenizer

__all__ = ["InternLMXComposer2Config", "InternLMXComposer2ForCausalLM", "InternLMXComposer2Model",
           "InternLMXComposer2Processor", "InternLMXComposer2Tokenizer", "PLoRALinear"]


def _register() -> None:
    config = InternLMXComposer2Config
    for register in (lambda: AutoConfig.register("internlmxcomposer2", config),
                     lambda: AutoModelForCausalLM.register(config, InternLMXComposer2ForCausalLM),
                     lambda: AutoModelForImageTextToText.register(config, InternLMXComposer2ForCausalLM),
                     lambda: AutoTokenizer.register(config, fast_tokenizer_class=InternLMXComposer2Tokenizer),
                     lambda: AutoProcessor.register(config, InternLMXComposer2Processor)):
        try:
            register()
        except ValueError:  # already registered (a re-import)
            pass


_register()
