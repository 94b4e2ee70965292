"""`mixtune doctor`: what this machine and install can run, before a run fails on it.

Three checks, each read from the source of truth rather than a copy of it: the core and optional packages
(mixtune's own requirements and extras, from the checkout's pyproject.toml or the installed metadata), each
imported for real; the hardware (GPU, bf16, flash-attention, torch_npu); and from both, which mixtune features
are usable and which are ruled out, with the install line that enables them. The exit code is non-zero when a
core package is missing, broken or of a version mixtune does not support.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import sys
from dataclasses import dataclass, field

from packaging.requirements import Requirement

# What each extra of pyproject.toml enables. An extra without a line here is still checked and listed.
EXTRA_FEATURES = {
    "deepspeed": "sharding: stage1 / stage2 / stage3 (DeepSpeed ZeRO; the CPU runs it with gloo)",
    "serve": "mixtune serve (the OpenAI-compatible HTTP server)",
    "classification": "the classification task: the timm family (EVA02, any timm model)",
    "open_clip": "the open_clip and coca families (EVA-CLIP, CoCa)",
    "open-clip": "the open_clip and coca families (EVA-CLIP, CoCa)",
    "eval": "BLEU-4, ROUGE-L and CIDEr in mixtune predict, eval_with_do_generation and CoCa's caption metrics",
    "video": "video files and audio clips (PyAV); frame folders need only Pillow",
    "qlora": "quantization: 4bit / 8bit (QLoRA through bitsandbytes; also needs a CUDA GPU)",
    "pref": "preference and RL tasks through TRL (DPO, KTO, GRPO)",
    "rl": "preference and RL tasks through TRL (DPO, KTO, GRPO)",
    "diffusion": "diffusion models through diffusers",
    "onnx": "mixtune export to ONNX (onnx, onnxruntime)",
    "liger": "Liger kernels (fused losses and layers)",
    "yolo": "YOLO detection through ultralytics",
    "detection": "the detection task: Grounding DINO's Hungarian matcher (scipy) and COCO box mAP (pycocotools)",
}
# distribution name -> module to import, where they differ
MODULES = {"open-clip-torch": "open_clip", "pillow": "PIL", "pyyaml": "yaml", "liger-kernel": "liger_kernel",
           "flash-attn": "flash_attn", "torch-npu": "torch_npu", "onnxscript": "onnxscript",
           "protobuf": "google.protobuf"}
# packages no extra installs but features need (pip by hand, matched to the machine's CUDA / CANN)
HARDWARE_PACKAGES = {"flash-attn": "attn_implementation: flash_attention_2 (and MixToken's varlen packing)",
                     "torch-npu": "device: npu (Ascend)"}


def import_module(name: str):
    """Imports a package to check it, leaving PIL.Image.open as it was: ultralytics replaces it process-wide on
    import, and its replacement turns an unreadable image into ModuleNotFoundError (pi_heif) instead of PIL's
    error, which mixtune's bad-image checks rely on (`mixtune doctor` may run inside another program's process)."""
    from PIL import Image

    pil_open = Image.open
    try:
        return importlib.import_module(name)
    finally:
        Image.open = pil_open


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class Package:
    name: str  # distribution name, as pip installs it
    needs: str  # version specifier, "" for any
    extra: str | None  # None: core
    version: str | None = None
    problem: str | None = None  # None: imports and its version fits

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def missing(self) -> bool:
        return self.problem == "not installed"


def check_package(name: str, needs: str = "", extra: str | None = None) -> Package:
    from packaging.specifiers import SpecifierSet

    pkg = Package(name, needs, extra)
    module = MODULES.get(name.lower(), name.lower().replace("-", "_"))
    try:
        imported = import_module(module)
    except ModuleNotFoundError as e:
        pkg.problem = "not installed" if (e.name or module).split(".")[0] == module.split(".")[0] else \
            f"installed, but importing it fails: {e}"
        return pkg
    except Exception as e:  # a broken install: wrong binary, missing shared library, an incompatible torch
        pkg.problem = f"installed, but importing it fails: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return pkg
    pkg.version = installed_version(name) or getattr(imported, "__version__", None)
    if needs and pkg.version and not SpecifierSet(needs).contains(pkg.version, prereleases=True):
        pkg.problem = f"version {pkg.version} does not satisfy {needs}"
    return pkg


def requirements() -> tuple[list[Requirement], dict[str, list[Requirement]]]:
    """(core requirements, {extra: requirements}) from the checkout's pyproject.toml when mixtune runs from one
    (it is newer than any installed metadata), else from the installed package's metadata."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    pyproject = os.path.join(root, "pyproject.toml")
    if os.path.exists(pyproject):
        import tomllib

        with open(pyproject, "rb") as f:
            project = tomllib.load(f).get("project", {})
        if project.get("name") == "mixtune":
            extras = {name: [Requirement(r) for r in reqs]
                      for name, reqs in project.get("optional-dependencies", {}).items()}
            return [Requirement(r) for r in project.get("dependencies", [])], extras
    meta = importlib.metadata.metadata("mixtune")
    reqs = [Requirement(line) for line in meta.get_all("Requires-Dist") or []]
    core = [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]
    extras = {extra: [r for r in reqs if r.marker is not None and r.marker.evaluate({"extra": extra})]
              for extra in meta.get_all("Provides-Extra") or []}
    return core, extras


def check_packages() -> tuple[list[Package], list[Package]]:
    core_reqs, extras = requirements()
    core = [check_package(r.name, str(r.specifier)) for r in core_reqs]
    optional, seen = [], set()
    for extra, reqs in extras.items():
        for r in reqs:
            if r.name == "mixtune" or extra == "dev":  # dev: the test tools and every other extra
                continue
            if r.name not in seen:
                seen.add(r.name)
                optional.append(check_package(r.name, str(r.specifier), extra))
    for name in HARDWARE_PACKAGES:
        optional.append(check_package(name, "", None))
    return core, optional


@dataclass
class Hardware:
    gpus: list[str] = field(default_factory=list)
    cuda: str | None = None
    capability: tuple[int, int] | None = None
    bf16: bool = False
    flash_attention_2: bool = False
    npu: bool = False
    torch_build: str = ""


def check_hardware() -> Hardware:
    import torch

    hw = Hardware(cuda=torch.version.cuda, torch_build=f"{torch.__version__}" + (
        f" (CUDA {torch.version.cuda})" if torch.version.cuda else " (CPU only)"))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            memory = props.total_memory / 1024 ** 3
            hw.gpus.append(f"{props.name} ({memory:.0f} GiB, compute {props.major}.{props.minor})")
        hw.capability = torch.cuda.get_device_capability(0)
        hw.bf16 = torch.cuda.is_bf16_supported()
        from transformers.utils import is_flash_attn_2_available

        hw.flash_attention_2 = bool(is_flash_attn_2_available()) and hw.capability >= (8, 0)
    npu = getattr(torch, "npu", None)
    hw.npu = bool(npu is not None and hasattr(npu, "is_available") and npu.is_available())
    return hw


@dataclass
class Feature:
    name: str
    usable: bool
    why: str = ""  # what rules it out and how to enable it


def pip_extra(extra: str | None, name: str) -> str:
    return f"pip install 'mixtune[{extra}]'" if extra else f"pip install {name}"


def features(core: list[Package], optional: list[Package], hw: Hardware) -> list[Feature]:
    by_name = {p.name: p for p in optional}
    core_ok = all(p.ok for p in core)
    gpu = bool(hw.gpus)
    out = [Feature("training: full fine-tuning, LoRA, MixToken packing, freezing; predict, chat, export", core_ok,
                   "" if core_ok else "a core package is missing or broken (above)"),
           Feature("GPU training", gpu, "" if gpu else "torch sees no CUDA GPU: training runs on the CPU"),
           Feature("bf16: true", gpu and hw.bf16, "" if gpu and hw.bf16 else
                   ("this GPU has no bf16: use fp16: true" if gpu else "on a CPU bf16 runs, but slower than fp32")),
           Feature("fp16: true", gpu, "" if gpu else "needs a GPU"),
           Feature("sharding_engine: fsdp (FSDP2)", gpu, "" if gpu else "needs GPUs (on a CPU use DeepSpeed)"),
           Feature("several GPUs in one process group (nproc_per_node > 1 on GPUs)", len(hw.gpus) > 1,
                   "" if len(hw.gpus) > 1 else f"{len(hw.gpus)} GPU(s) here")]
    flash = by_name.get("flash-attn")
    fa_why = "" if hw.flash_attention_2 else (
        "needs a CUDA GPU of compute capability 8.0 or newer" if not gpu or (hw.capability or (0, 0)) < (8, 0) else
        f"flash-attn {flash.problem if flash else 'not installed'}: pip install flash-attn --no-build-isolation")
    out.append(Feature(HARDWARE_PACKAGES["flash-attn"], hw.flash_attention_2, fa_why))
    npu = by_name.get("torch-npu")
    out.append(Feature(HARDWARE_PACKAGES["torch-npu"], hw.npu,
                       "" if hw.npu else "torch_npu is " + (npu.problem if npu and not npu.ok else "installed, but "
                                                            "sees no NPU")))
    extras: dict[str, list[Package]] = {}
    for p in optional:
        if p.extra:
            extras.setdefault(p.extra, []).append(p)
    for extra, pkgs in extras.items():
        bad = [p for p in pkgs if not p.ok]
        usable = not bad
        why = "; ".join(f"{p.name} {p.problem}" for p in bad) + (f": {pip_extra(extra, '')}" if bad else "")
        if usable and extra == "qlora" and not gpu:
            usable, why = False, "bitsandbytes is installed, but quantization needs a CUDA GPU"
        out.append(Feature(f"[{extra}] {EXTRA_FEATURES.get(extra, 'the ' + extra + ' extra')}", usable, why))
    return out


@dataclass
class Report:
    core: list[Package]
    optional: list[Package]
    hardware: Hardware
    features: list[Feature]

    @property
    def core_ok(self) -> bool:
        return all(p.ok for p in self.core)

    @property
    def missing(self) -> list[str]:
        return [p.name for p in self.optional if p.missing]


def diagnose() -> Report:
    core, optional = check_packages()
    hw = check_hardware() if any(p.name == "torch" and p.ok for p in core) else Hardware()
    return Report(core, optional, hw, features(core, optional, hw))


def package_line(p: Package) -> str:
    mark = "ok     " if p.ok else ("missing" if p.missing else "BROKEN ")
    version = p.version or "-"
    needs = f" (needs {p.needs})" if p.needs else ""
    extra = f" [{p.extra}]" if p.extra else f" (for {HARDWARE_PACKAGES[p.name]})" if p.name in HARDWARE_PACKAGES else ""
    problem = f": {p.problem}" if p.problem and not p.missing else ""
    fix = f": {pip_extra(p.extra, p.name)}" if not p.ok and p.extra else ""
    return f"  {mark}  {p.name} {version}{needs}{extra}{problem}{fix}"


def format_report(report: Report) -> str:
    from mixtune import __version__ as mixtune_version

    hw = report.hardware
    lines = [f"mixtune {mixtune_version}, Python {platform.python_version()} on {platform.system()} "
             f"{platform.machine()} ({os.cpu_count()} CPU cores)", "", "core packages:"]
    lines += [package_line(p) for p in report.core]
    lines += ["", "optional packages (pip install 'mixtune[EXTRA]'):"]
    lines += [package_line(p) for p in report.optional]
    lines += ["", "hardware:",
              "  GPU: " + ("; ".join(f"{i}: {g}" for i, g in enumerate(hw.gpus)) if hw.gpus else "none (CPU only)")
              + (f", CUDA {hw.cuda}" if hw.gpus and hw.cuda else ""),
              f"  torch build: {hw.torch_build}",
              f"  bf16: {'yes' if hw.bf16 else 'no' if hw.gpus else 'CPU only (runs, slowly)'}",
              f"  flash-attention 2: {'usable' if hw.flash_attention_2 else 'not usable'}",
              f"  Ascend NPU (torch_npu): {'usable' if hw.npu else 'no'}",
              "", "features:"]
    for f in report.features:
        lines.append(f"  {'yes' if f.usable else 'no '}  {f.name}" + (f"\n         {f.why}" if f.why else ""))
    if report.missing:
        lines += ["", f"missing optional packages: {', '.join(report.missing)}"]
    lines += ["", "core install: OK" if report.core_ok else
              "core install: BROKEN (" + "; ".join(f"{p.name}: {p.problem}" for p in report.core if not p.ok) +
              "); reinstall: pip install -e . (or make install)"]
    return "\n".join(lines) + "\n"


def report_json(report: Report) -> dict:
    from dataclasses import asdict

    return {"core_ok": report.core_ok, "missing_optional": report.missing,
            "core": [asdict(p) for p in report.core], "optional": [asdict(p) for p in report.optional],
            "hardware": asdict(report.hardware), "features": [asdict(f) for f in report.features]}


def run_doctor(as_json: bool = False) -> int:
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):  # what packages print as they import (DeepSpeed's accelerator)
        report = diagnose()
    if as_json:
        import json

        print(json.dumps(report_json(report), indent=1))
    else:
        sys.stdout.write(format_report(report))
    return 0 if report.core_ok else 1
