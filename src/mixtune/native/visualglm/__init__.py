"""VisualGLM-6B (`model_type` "chatglm") as a native port; importing this registers it with transformers' Auto
classes, so `AutoModelForCausalLM` / `AutoModel` / `AutoProcessor` / `AutoTokenizer.from_pretrained(folder)` load a
published VisualGLM-6B folder without `trust_remote_code`."""

from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText,
                          AutoModelForSeq2SeqLM, AutoProcessor, AutoTokenizer)

from mixtune.native.visualglm.configuration_chatglm import ChatGLMConfig
from mixtune.native.visualglm.modeling_chatglm import ChatGLMForConditionalGenerationWithImage

__all__ = ["ChatGLMConfig", "ChatGLMForConditionalGenerationWithImage"]


def _register() -> None:
    from mixtune.native.visualglm.processing_visualglm import VisualGLMProcessor
    from mixtune.native.visualglm.tokenization_chatglm import ChatGLMTokenizer

    model = ChatGLMForConditionalGenerationWithImage
    # the published auto_map names AutoModel and AutoModelForSeq2SeqLM for this class
    for register in (lambda: AutoConfig.register("chatglm", ChatGLMConfig),
                     lambda: AutoModelForCausalLM.register(ChatGLMConfig, model),
                     lambda: AutoModelForImageTextToText.register(ChatGLMConfig, model),
                     lambda: AutoModel.register(ChatGLMConfig, model),
                     lambda: AutoModelForSeq2SeqLM.register(ChatGLMConfig, model),
                     lambda: AutoTokenizer.register(ChatGLMConfig, slow_tokenizer_class=ChatGLMTokenizer),
                     lambda: AutoProcessor.register(ChatGLMConfig, VisualGLMProcessor)):
        try:
            register()
        except ValueError:  # already registered (a re-import)
            pass


_register()
