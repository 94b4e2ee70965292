"""The `Family` record: everything mixtune needs to know about one kind of checkpoint, and nothing more.

A family file builds one `Family` and registers it. Fields left at their defaults mean "the generic
path works": the checkpoint's processor and chat template render and tokenise the conversation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mixtune.data.grounding import DEFAULT_STYLE, GroundingStyle


# Where transformers 5 puts most VLMs' language model and head, and the LoRA targets mixtune defaults to:
# that language model's attention and MLP projections (the vision tower untouched).
LANGUAGE_MODEL = ("model.language_model.*", "lm_head.*")
LM_PROJECTIONS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


# Tasks that start from what another task trained: a chat (SFT) checkpoint goes on to DPO or GRPO.
FOLLOW_ON_TASKS = {"chat": ("dpo", "kto", "grpo")}


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json `model_type` values served by this family
    # fnmatch globs over parameter names, for freeze shortcuts and LoRA defaults
    vision: tuple[str, ...]
    projector: tuple[str, ...]
    # What one image looks like in rendered prompt text: used when a user template (PaddleMIX's
    # chat_template.json shape) writes `<image>` and the processor expects its own token.
    image_placeholder: str
    # Writes a tiny random-weight checkpoint of the real architecture into a folder.
    build_tiny: Callable[[str], None]
    language: tuple[str, ...] = LANGUAGE_MODEL
    # regex over module names: peft's default LoRA targets
    lora_targets: str = LM_PROJECTIONS
    # Optional: Conversation + images -> Encoded, where the generic path (chat template, one processor call,
    # labels through character offsets) cannot work: PaliGemma's prefix/suffix, BLIP-2's query tokens.
    encode: Callable[..., Any] | None = None
    # Optional: Conversation + images -> generate() inputs for its last user turn (same signature as encode).
    generation_inputs: Callable[..., Any] | None = None
    # The prompt format for checkpoints that ship no chat template (BLIP-2's "Question: ... Answer: ...").
    default_chat_template: str | None = None
    # False where prompts are not chat-templated at all (PaliGemma's prefix/suffix): no template is required.
    uses_chat_template: bool = True
    # Optional: per-sample media dicts -> one batch, for pixel inputs whose shapes differ between samples
    # beyond dim 0 (image tiles, patches, image counts). Default: concatenate along dim 0.
    collate_media: Callable[[list[dict]], dict] | None = None
    # Python modules the family's processor imports beyond mixtune's dependencies (SmolVLM: num2words).
    requires: tuple[str, ...] = ()
    # attention implementations that load but compute something else for this family: {name: why}
    refused_attn: dict = field(default_factory=dict)
    # MixToken packing: (model, Encoded sample) -> that sample's position ids as the model takes them for a
    # batch of one: (L,) for 1-D RoPE (`mixtune.data.pack.text_positions`), (rows, L) for M-RoPE. Packed
    # rows concatenate them; positions restarting at 0 are what keep samples apart. None: the family
    # cannot pack exactly, and `mixtoken: true` is refused when the config is read.
    pack_positions: Callable[[Any, Any], Any] | None = None
    # Why the family cannot pack, when it is not a missing hook but the architecture (said when mixtoken is refused).
    no_packing_reason: str | None = None
    # transformers Auto class that loads the full model, or a model class's import path ("pkg.mod.Class").
    auto_class: str = "AutoModelForImageTextToText"
    # How ms-swift grounding data (`<ref-object>` / `<bbox>` + `objects`) is written for this model: its markup
    # and coordinate convention (data/grounding.py). The default: plain names and [x1, y1, x2, y2] in 0-1000.
    grounding: GroundingStyle = DEFAULT_STYLE
    # What one video looks like in rendered prompt text (its chat template's markup for a {"type": "video"}
    # part); None: the family takes no video, and samples with videos are refused naming the family.
    video_placeholder: str | None = None
    # The same for one audio clip (None: no audio); `reads_images` False for audio-only models.
    audio_placeholder: str | None = None
    reads_images: bool = True
    # What the family's checkpoints are trained for when the config gives no `task` (mixtune/tasks/).
    task: str = "chat"
    # The tasks its checkpoints can train for; None: its own `task` and those that train further what that task
    # trained (FOLLOW_ON_TASKS: preference and RL tuning of a chat model).
    tasks: tuple[str, ...] | None = None
    # Named parts, in priority order: ((part, fnmatch globs over parameter names), ...). The first part whose
    # globs match a parameter owns it; `freeze_<part>`, `lora_modules_to_save` and per-part rates use them.
    # Empty: the chat families' projector / vision / language (the projector first: some live in the tower).
    parts: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # False where `lora: true` is refused (a reason in the family's task module); list-models shows it
    supports_lora: bool = True
    # Native ports that keep the published names where PaddleMIX renamed modules: our parameter / module name ->
    # PaddleMIX's name(s); PaddleMIX's freeze globs and LoRA regexes are then read over those (paddle_compat)
    paddle_names: Callable[[str], tuple[str, ...]] | None = None
    # A second family of a `model_type` another family serves (MiniMonkey is `internvl_chat`): takes a checkpoint
    # only when this says so, from the checkpoint's raw config.json. None: the family owns its model types.
    claims: Callable[[dict], bool] | None = None
    # Optional: checkpoint folder -> processor, where AutoProcessor would pick another family's (a claiming family
    # whose published folders ship no processor files). None: AutoProcessor.
    load_processor: Callable[[str], Any] | None = None
    # config.json `architectures` names this family serves: read when a published config.json names no usable
    # `model_type` (THUDM's CogVLM / CogAgent: their remote-code config class declares none)
    architectures: tuple[str, ...] = ()
    # Optional: called with each model loaded from a checkpoint, to give it what mixtune's tools expect of it
    # (Grounding DINO: the get_input_embeddings peft asks for). None: nothing to add.
    after_load: Callable[[Any], None] | None = None


    @property
    def task_choices(self) -> tuple[str, ...]:
        return self.tasks if self.tasks is not None else (self.task,) + FOLLOW_ON_TASKS.get(self.task, ())

    @property
    def media_kinds(self) -> tuple[str, ...]:
        """What the family's models read besides text: `mixtune list-models` shows it."""
        return ((("image",) if self.reads_images else ()) + (("video",) if self.video_placeholder is not None else ())
                + (("audio",) if self.audio_placeholder is not None else ()))

    def named_parts(self) -> dict[str, tuple[str, ...]]:
        if self.parts:
            return dict(self.parts)
        return {"projector": self.projector, "vision": self.vision, "language": self.language}

    def check_requires(self) -> None:
        import importlib.util

        from mixtune.errors import MixtuneError

        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            raise MixtuneError(f"the {self.name} processor needs {', '.join(missing)}: pip install {' '.join(missing)}")
