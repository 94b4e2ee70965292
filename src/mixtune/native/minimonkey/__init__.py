"""MiniMonkey (InternVL2 with multi-scale adaptive cropping, `model_type` "internvl_chat") on top of mixtune's
InternVL2 port. Importing this registers MiniMonkey's processor classes by name, so `AutoProcessor` reloads a saved
MiniMonkey processor as one; `model_type` "internvl_chat" itself stays InternVL2's (mixtune.native.internvl_chat)."""

from transformers import AutoImageProcessor, AutoProcessor

from mixtune.native.internvl_chat import InternVLChatConfig
from mixtune.native.minimonkey.modeling_minimonkey import MiniMonkeyChatModel
from mixtune.native.minimonkey.processing_minimonkey import MiniMonkeyImageProcessor, MiniMonkeyProcessor

__all__ = ["MiniMonkeyChatConfig", "MiniMonkeyChatModel", "MiniMonkeyImageProcessor", "MiniMonkeyProcessor"]


class MiniMonkeyChatConfig(InternVLChatConfig):
    """InternVL2's config under MiniMonkey's name: only the key transformers' Auto registries file MiniMonkey's
    processor classes under (they find a saved `processor_class` by name among registered classes). Checkpoints
    keep `model_type` "internvl_chat" and load InternVLChatConfig."""


def _register() -> None:
    for register in (lambda: AutoImageProcessor.register(MiniMonkeyChatConfig,
                                                         slow_image_processor_class=MiniMonkeyImageProcessor),
                     lambda: AutoProcessor.register(MiniMonkeyChatConfig, MiniMonkeyProcessor)):
        try:
            register()
        except ValueError:  # already registered (a re-import)
            pass


_register()
