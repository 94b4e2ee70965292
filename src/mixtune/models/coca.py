"""CoCa through open_clip: contrastive plus captioning loss (see open_clip_family.py)."""

from mixtune.models.open_clip_family import COCA as FAMILY  # noqa: F401
