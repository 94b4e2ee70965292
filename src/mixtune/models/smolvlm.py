"""SmolVLM: Idefics3's architecture at small sizes, with a video processor; same layout and prompts.
Its processor spells out frame timestamps with `num2words`, which it imports at construction."""

from __future__ import annotations

import dataclasses

from mixtune.models import idefics3


def build_tiny(output_dir: str) -> str:
    return idefics3.build_tiny(output_dir, kind="smolvlm")


FAMILY = dataclasses.replace(idefics3.FAMILY, name="smolvlm", model_types=("smolvlm",), build_tiny=build_tiny,
                             requires=("num2words",))
