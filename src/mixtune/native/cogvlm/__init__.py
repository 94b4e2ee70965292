"""CogVLM (`model_type` "cogvlm") and CogAgent ("cogagent") as native ports; importing this registers them with
transformers' Auto classes, so `AutoModelForCausalLM` / `AutoProcessor.from_pretrained(folder)` load a CogVLM or
CogAgent folder without `trust_remote_code`. The tokenizer is the Vicuna (Llama) one: transformers' own
LlamaTokenizerFast."""

from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor,
                          AutoTokenizer, LlamaTokenizerFast)

from mixtune.native.cogvlm.configuration_cogvlm import CogAgentConfig, CogVLMConfig
from mixtune.native.cogvlm.modeling_cogvlm import CogAgentForCausalLM, CogVLMForCausalLM, CogVLMModel
from mixtune.native.cogvlm.processing_cogvlm import CogVLMProcessor

__all__ = ["CogAgentConfig", "CogAgentForCausalLM", "CogVLMConfig", "CogVLMForCausalLM", "CogVLMModel",
           "CogVLMProcessor"]


def _register() -> None:
    for config, model, model_type in ((CogVLMConfig, CogVLMForCausalLM, "cogvlm"),
                                      (CogAgentConfig, CogAgentForCausalLM, "cogagent")):
        for register in (lambda: AutoConfig.register(model_type, config),
                         lambda: AutoModelForCausalLM.register(config, model),
                         lambda: AutoModelForImageTextToText.register(config, model),
                         lambda: AutoTokenizer.register(config, fast_tokenizer_class=LlamaTokenizerFast),
                         lambda: AutoProcessor.register(config, CogVLMProcessor)):
            try:
                register()
            except ValueError:  # already registered (a re-import)
                pass


_register()
