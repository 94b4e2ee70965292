"""CogAgent (`model_type` "cogagent"): CogVLM plus a high-resolution cross-attention branch; see
mixtune.models.cogvlm (shared port, templates and parts). The processor gives each image twice: `pixel_values` at
the low-resolution tower's size and `cross_pixel_values` at `cross_image_size`. Not packed (pack_positions None:
`mixtoken: true` is refused), because each row's cross-attention reads one high-resolution image."""

from __future__ import annotations

from dataclasses import replace

from mixtune.models.cogvlm import COGAGENT_TEMPLATE, FAMILY as COGVLM, build_tiny_agent

FAMILY = replace(COGVLM, name="cogagent", model_types=("cogagent",), build_tiny=build_tiny_agent,
                 pack_positions=None, default_chat_template=COGAGENT_TEMPLATE,
                 no_packing_reason="its cross-attention reads one high-resolution image per row, so the samples of "
                                   "a packed row would read each other's images")
