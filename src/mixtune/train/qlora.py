"""QLoRA: `quantization: 4bit | 8bit` loads the language model's linear layers quantised by bitsandbytes
(NF4 or FP4 with double quantisation, or LLM.int8) under LoRA adapters; the vision tower, the projector and
the output head stay in full precision. `mixtune merge-lora` of such a run loads the base in full precision
and writes a full-precision merged checkpoint.

transformers quantises the weights as it moves them to the GPU: weights loaded on the CPU keep their layers
replaced but unquantised, and bitsandbytes then fails inside its kernel. So a CPU run is refused when the
config is read (`check_quantization`), not at the first step.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass

import torch

from mixtune.errors import ConfigError

QUANTIZATIONS = ("4bit", "8bit")
QUANT_TYPES = ("nf4", "fp4")


@dataclass(frozen=True)
class Quantization:
    bits: str  # "4bit" or "8bit"
    quant_type: str = "nf4"
    compute_dtype: torch.dtype = torch.float32


def check_quantization(mix, use_cpu: bool) -> None:
    """One clear line for a QLoRA config that cannot run, before the model loads."""
    if mix.quantization is None:
        return
    if mix.quantization not in QUANTIZATIONS:
        raise ConfigError(f"must be one of {QUANTIZATIONS}, got {mix.quantization!r}", key="quantization")
    if mix.quant_type not in QUANT_TYPES:
        raise ConfigError(f"must be one of {QUANT_TYPES}, got {mix.quant_type!r}", key="quant_type")
    if not mix.lora:
        raise ConfigError("needs lora: true (quantised weights cannot be trained; QLoRA trains adapters on "
                          "them)", key="quantization")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("needs bitsandbytes: pip install 'mixtune[qlora]'", key="quantization")
    if use_cpu or not torch.cuda.is_available():
        raise ConfigError("needs a CUDA GPU: transformers quantises weights only as it moves them to the GPU "
                          "(on the CPU bitsandbytes gets unquantised weights); train without quantization "
                          "on the CPU", key="quantization")


def from_config(mix, args) -> Quantization | None:
    if mix.quantization is None:
        return None
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    return Quantization(mix.quantization, mix.quant_type, dtype)


def skipped_modules(family) -> list[str]:
    """Module-name prefixes kept in full precision: the family's vision tower and projector (the output head
    transformers keeps itself)."""
    return sorted({g.removesuffix(".*") for g in family.vision + family.projector if "*" not in
                   g.removesuffix(".*")} | {"lm_head"})


def quantization_kwargs(mix, args, task) -> dict:
    """`task.load`'s extra arguments: none without quantization; tasks whose loader takes no quantization
    (only the chat task's does) refuse it."""
    quant = from_config(mix, args)
    if quant is None:
        return {}
    if "quantization" not in inspect.signature(task.load).parameters:
        raise ConfigError(f"is not supported by the {task.__name__.rsplit('.', 1)[-1]} task (chat models only)",
                          key="quantization")
    return {"quantization": quant}


def bnb_config(quant: Quantization, family):
    from transformers import BitsAndBytesConfig

    skip = skipped_modules(family)
    if quant.bits == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=quant.compute_dtype,
                              llm_int8_skip_modules=skip)


def load_kwargs(quant: Quantization | None, family) -> dict:
    """Extra `from_pretrained` arguments: the quantisation config, and each rank's own GPU."""
    if quant is None:
        return {}
    from accelerate import PartialState

    return {"quantization_config": bnb_config(quant, family), "device_map": {"": PartialState().local_process_index}}
