"""InternLM2 (`model_type` "internlm2") as a native port: the language model of InternVL2 (2B, 4B... 26B) and of
InternLM-XComposer2. Importing this registers it with transformers' Auto classes, so
`AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(folder)` load a published InternLM2 folder without
`trust_remote_code`. Subclasses change the projections through `InternLM2Model.linear_class`."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from mixtune.native.internlm2.configuration_internlm2 import InternLM2Config
from mixtune.native.internlm2.modeling_internlm2 import (InternLM2DecoderLayer, InternLM2ForCausalLM, InternLM2Model,
                                                         InternLM2PreTrainedModel)
from mixtune.native.internlm2.tokenization_internlm2 import InternLM2Tokenizer

__all__ = ["InternLM2Config", "InternLM2DecoderLayer", "InternLM2ForCausalLM", "InternLM2Model",
           "InternLM2PreTrainedModel", "InternLM2Tokenizer"]


def _register() -> None:
    for register in (lambda: AutoConfig.register("internlm2", InternLM2Config),
                     lambda: AutoModel.register(InternLM2Config, InternLM2Model),
                     lambda: AutoModelForCausalLM.register(InternLM2Config, InternLM2ForCausalLM),
                     lambda: AutoTokenizer.register(InternLM2Config, fast_tokenizer_class=InternLM2Tokenizer)):
        try:
            register()
        except ValueError:  # already registered (a re-import)
            pass


_register()
