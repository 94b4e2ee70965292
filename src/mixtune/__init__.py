"""mixtune: one config file to fine-tune multimodal models with transformers, peft and torch."""

__version__ = "0.1.0"
