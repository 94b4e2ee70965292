"""InternVL2 (`model_type` "internvl_chat", the original remote-code layout: InternVL2-1B ... 76B, MiniMonkey) as a
native port; importing this registers it with transformers' Auto classes, so `AutoModelForCausalLM` /
`AutoModelForImageTextToText` / `AutoProcessor.from_pretrained(folder)` load a published folder by its own key
names without `trust_remote_code`. The transformers-native `-hf` checkpoints (`model_type` "internvl") are
transformers' own classes, not these."""

from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM,
                          AutoModelForImageTextToText, AutoProcessor)

from mixtune.native.internvl_chat.configuration_internvl_chat import InternVisionConfig, InternVLChatConfig
from mixtune.native.internvl_chat.modeling_intern_vit import InternVisionModel
from mixtune.native.internvl_chat.modeling_internvl_chat import InternVLChatModel
from mixtune.native.internvl_chat.processing_internvl_chat import InternVLChatImageProcessor, InternVLChatProcessor

__all__ = ["InternVLChatConfig", "InternVLChatImageProcessor", "InternVLChatModel", "InternVLChatProcessor",
           "InternVisionConfig", "InternVisionModel"]


def _register() -> None:
    for register in (lambda: AutoConfig.register("internvl_chat", InternVLChatConfig),
                     lambda: AutoConfig.register("intern_vit_6b", InternVisionConfig),
                     lambda: AutoModel.register(InternVisionConfig, InternVisionModel),
                     lambda: AutoModelForCausalLM.register(InternVLChatConfig, InternVLChatModel),
                     lambda: AutoModelForImageTextToText.register(InternVLChatConfig, InternVLChatModel),
                     lambda: AutoImageProcessor.register(InternVLChatConfig,
                                                         slow_image_processor_class=InternVLChatImageProcessor),
                     lambda: AutoProcessor.register(InternVLChatConfig, InternVLChatProcessor)):
        try:
            register()
        except ValueError:  # already registered (a re-import)
            pass


_register()
