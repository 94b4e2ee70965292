"""Several processes (launched by torchrun): who writes, who waits, how one rank's error stops them all, and
how the config's parallelism keys become DeepSpeed / FSDP2 settings for transformers' Trainer.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; transformers' TrainingArguments joins the process group when
the config is built, so everything after `load_config` may use collectives. The rules kept here:
- only the main process (global rank 0) writes output_dir files and the length cache;
- the length scan runs on the main process first; the others then read its cache;
- a phase that can fail on one rank ends in `agree`, which every rank reaches: each rank's outcome is
  gathered and every rank raises the first failing rank's error, so none is left waiting in a collective;
- no collective runs on a subset of ranks (the helpers here are called by every rank, or by none).
Errors before the process group exists (config loading) are the same on every rank: each reads the same
file. Errors inside the training loop (a sample that fails in one rank's loader) end that rank; the others
then fail in their next collective (the peer is gone) or are stopped by torchrun, within `ddp_timeout`.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from contextlib import contextmanager

from mixtune.errors import ConfigError, MixtuneError

log = logging.getLogger("mixtune")


def _dist():
    if "torch.distributed" not in sys.modules:  # no process group without it; keeps CLI start-up light
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    dist = _dist()
    if dist and dist.get_world_size() > 1:
        dist.barrier()


class RankFailed(MixtuneError):
    """Another rank's error, raised on this rank so that every process stops with the same message."""


def agree(error: BaseException | None) -> None:
    """Every rank calls this with its own outcome (None: fine); if any rank failed, every rank raises the
    first failing rank's error: the failing rank its own exception, the others a copy of its message."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return
    outcome = None if error is None else (type(error).__name__, str(error), isinstance(error, MixtuneError))
    outcomes = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, outcome)
    failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if not failed:
        return
    if error is not None:
        raise error
    first_rank, (kind, message, user_error) = failed[0]
    if user_error:  # the user's data or config: the same one line on every rank
        raise RankFailed(message) from None
    raise RuntimeError(f"rank {first_rank} failed: {kind}: {message}")


@contextmanager
def main_process_first():
    """The block runs on the main process, then on the others (who then find what it cached).

    An error in the main process's block is raised on every rank, without the others running theirs; an
    error in any other rank's block is raised on every rank too."""
    main = is_main_process()
    if not main:
        agree(None)  # pairs with the main process's report below; raises its error
    error = None
    try:
        yield
    except Exception as e:  # reported to the others, then raised here by `agree`
        error = e
    if main:
        agree(error)
    agree(error if not main else None)


def log_format() -> str:
    """The log line format: with several processes, each line says which rank speaks."""
    base = "%(asctime)s %(name)s: %(message)s"
    return f"[rank {rank()}] {base}" if world_size() > 1 else base


def quiet_replicas() -> None:
    """Other ranks log warnings and errors only: the main process reports progress once for all."""
    if not is_main_process():
        logging.getLogger("mixtune").setLevel(logging.WARNING)


# ---- relaunching under torchrun --------------------------------------------------------------------------

LAUNCH_FLAGS = ("nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port", "rdzv_endpoint",
                "rdzv_backend", "rdzv_id", "max_restarts")
LAUNCH_SWITCHES = ("standalone",)  # torchrun flags without a value


def split_launch_flags(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """Pull torchrun's flags (`--nproc_per_node 2`, `--nnodes=2`, ...) out of `mixtune train`'s extra
    arguments; the rest are config overrides."""
    launch, rest, i = {}, [], 0
    while i < len(args):
        key, eq, value = args[i][2:].partition("=") if args[i].startswith("--") else ("", "", "")
        if key in LAUNCH_SWITCHES:
            launch[key] = None
        elif key.replace("-", "_") in LAUNCH_FLAGS:
            if not eq:
                if i + 1 >= len(args):
                    raise ConfigError(f"--{key} needs a value")
                i += 1
                value = args[i]
            launch[key.replace("-", "_")] = value
        else:
            rest.append(args[i])
        i += 1
    return launch, rest


def torchrun_command(launch: dict[str, str], train_args: list[str]) -> list[str]:
    """`python -m torch.distributed.run <flags> -m mixtune train <config> <overrides>`."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    for key, value in launch.items():
        cmd += [f"--{key}"] if value is None else [f"--{key}", str(value)]
    return cmd + ["-m", "mixtune", "train"] + train_args


def needs_launcher(config_path: str, overrides: list[str]) -> bool:
    """Whether a run outside any launcher asks for DeepSpeed (`sharding` or `deepspeed`), which needs a process
    group even for one process: `mixtune train` then runs itself under torchrun with one process."""
    if "WORLD_SIZE" in os.environ:
        return False
    from mixtune.config import parse_overrides, read_config_file

    try:
        raw = {**read_config_file(config_path), **parse_overrides(overrides)}
    except MixtuneError:
        return False  # load_config reports it
    return bool(raw.get("sharding") or raw.get("deepspeed")) and raw.get("sharding_engine") != "fsdp"


def relaunch_under_torchrun(launch: dict[str, str], train_args: list[str]) -> int:
    """Run this `mixtune train` again as torchrun's workers; torchrun's exit code is ours."""
    import subprocess

    if "WORLD_SIZE" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
        raise ConfigError("--nproc_per_node given inside a torchrun worker; launch with one or the other",
                          key="nproc_per_node")
    cmd = torchrun_command(launch, train_args)
    log.info("launching: %s", shlex.join(cmd))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default too; said here so it is not a surprise
    return subprocess.call(cmd, env=env)


# ---- the parallelism keys -> DeepSpeed / FSDP2 settings --------------------------------------------------

ENGINES = ("deepspeed", "fsdp")
SHARDING_WORDS = ("stage1", "stage2", "stage3", "offload")


def parse_sharding(value) -> tuple[int, bool]:
    """The `sharding` key in PaddleNLP's forms ("stage2", "stage3 offload", ["stage2", "offload"],
    "stage1,offload") -> (ZeRO stage or 0, offload)."""
    items = value if isinstance(value, list) else [value]
    words = [w for item in items for w in str(item).replace(",", " ").split()]
    unknown = [w for w in words if w not in SHARDING_WORDS]
    if unknown:
        raise ConfigError(f"unknown sharding option {unknown[0]!r}; expected stage1, stage2 or stage3, "
                          "optionally with 'offload' (e.g. \"stage3 offload\")", key="sharding")
    stages = sorted({int(w[-1]) for w in words if w.startswith("stage")})
    if len(stages) > 1:
        raise ConfigError(f"give one stage, got {['stage%d' % s for s in stages]}", key="sharding")
    if "offload" in words and not stages:
        raise ConfigError("'offload' needs a stage, e.g. \"stage3 offload\"", key="sharding")
    return (stages[0] if stages else 0), "offload" in words


def launched_world_size() -> int:
    """The number of processes torchrun started (1 outside torchrun); known before the process group is."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def sharding_group(degree: int, world: int) -> int | None:
    """`sharding_parallel_degree` -> the size of a sharding group smaller than the world (hybrid sharding:
    shard within a group, replicate across groups), or None for sharding across every rank."""
    if degree in (-1, 1) or degree == world:  # 1 is the unset default; -1 is PaddleNLP's "all ranks"
        return None
    if degree < 1:
        raise ConfigError("must be a positive number of ranks, or -1 for all", key="sharding_parallel_degree")
    if degree > world:  # e.g. a PaddleMIX config written for 8 GPUs, run on fewer
        return None
    if world % degree:
        raise ConfigError(f"{degree} must divide the {world} process(es) launched", key="sharding_parallel_degree")
    return degree


def zero_config(stage: int, offload: bool, hpz_group: int | None = None) -> dict:
    """A DeepSpeed ZeRO config whose batch, accumulation, clipping and precision come from the
    TrainingArguments ("auto": transformers fills them in). The Trainer's own torch optimizer is kept
    (DeepSpeed's fused/CPU Adam needs compiled ops; `zero_force_ds_cpu_optimizer: false` allows a torch
    optimizer beside offloading). Stage 3 gathers the full weights when saving, so the final output_dir is
    one consolidated transformers folder."""
    zero: dict = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if hpz_group:
            zero["zero_hpz_partition_size"] = hpz_group  # ZeRO++ hpZ: a secondary weight shard per group
    return {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "zero_optimization": zero, "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False}


def fsdp_settings(stage: int, offload: bool, user_config: dict | None) -> dict:
    """FSDP2 through accelerate: stage3 reshards weights after each forward (full shard), stage2 keeps them
    gathered until backward (ZeRO-2-like); each decoder layer is wrapped (the model's `_no_split_modules`)."""
    if stage == 1:
        raise ConfigError("FSDP has no optimizer-state-only stage; use stage2 or stage3 with "
                          "sharding_engine: fsdp, or stage1 with DeepSpeed", key="sharding")
    config = {"version": 2, "reshard_after_forward": stage != 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
              "state_dict_type": "FULL_STATE_DICT", **(user_config or {})}
    if offload:
        config["cpu_offload"] = True
    return config


def check_device(device: str | None) -> None:
    if device == "npu":
        import importlib.util

        if importlib.util.find_spec("torch_npu") is None:
            raise ConfigError("'npu' needs the torch_npu package (Ascend's PyTorch plugin, its version matching "
                              "torch's); install it, or use device: gpu / cpu", key="device")


def apply_parallelism(mix, train_kwargs: dict, notes: list[str]) -> None:
    """Translate `sharding`, `sharding_engine`, `sharding_parallel_degree`, `tensor_parallel_degree` and
    `pipeline_parallel_degree` into TrainingArguments settings (`deepspeed`, `fsdp`, `fsdp_config`,
    `parallelism_config`), refusing what cannot run. Runs before TrainingArguments is built, since the
    engine decides how the process group starts."""
    if mix.pipeline_parallel_degree > 1:
        raise ConfigError("pipeline parallelism is not built in mixtune; to fit a model larger than one device "
                          "use sharding: \"stage3\" (DeepSpeed ZeRO-3, \"stage3 offload\" to move weights and "
                          "optimizer state to CPU memory) or sharding_engine: fsdp (FSDP2)",
                          key="pipeline_parallel_degree")
    for key in ("pipeline_parallel_degree", "tensor_parallel_degree"):
        if getattr(mix, key) < 1:
            raise ConfigError("must be >= 1", key=key)
    if mix.sharding_engine not in ENGINES:
        raise ConfigError(f"must be one of {ENGINES}, got {mix.sharding_engine!r}", key="sharding_engine")
    check_device(mix.device)
    stage, offload = parse_sharding(mix.sharding) if mix.sharding else (0, False)
    world = launched_world_size()
    group = sharding_group(mix.sharding_parallel_degree, world)
    on_cpu = bool(train_kwargs.get("use_cpu"))
    check_tensor_parallel(mix, world, on_cpu, sharded=bool(stage or train_kwargs.get("fsdp")
                                                           or train_kwargs.get("deepspeed")))
    if not stage:
        if group:
            notes.append("'sharding_parallel_degree' has no effect without 'sharding' (plain data parallel)")
        check_fsdp_device(train_kwargs, on_cpu)
        return
    given = "deepspeed" if train_kwargs.get("deepspeed") else "fsdp" if train_kwargs.get("fsdp") else None
    if given:  # transformers' own engine keys are complete settings: they win over the short form
        notes.append(f"'sharding: {mix.sharding}' has no effect: the '{given}' settings given win")
        check_fsdp_device(train_kwargs, on_cpu)
        return
    if mix.sharding_engine == "fsdp":
        if isinstance(train_kwargs.get("fsdp_config"), str):
            raise ConfigError("give fsdp_config as a mapping to combine it with 'sharding', or set 'fsdp' "
                              "yourself beside the file", key="fsdp_config")
        if group:
            from accelerate.parallelism_config import ParallelismConfig

            # HSDP: shard within groups of `group` ranks, replicate across the world // group groups
            train_kwargs["parallelism_config"] = ParallelismConfig(dp_replicate_size=world // group,
                                                                   dp_shard_size=group)
        train_kwargs["fsdp"] = True
        train_kwargs["fsdp_config"] = fsdp_settings(stage, offload, train_kwargs.get("fsdp_config"))
        check_fsdp_device(train_kwargs, on_cpu)
        return
    check_deepspeed_installed()
    if group and stage < 3:
        notes.append(f"sharding_parallel_degree {group}: ZeRO-{stage} shards optimizer state across all "
                     f"{world} ranks (DeepSpeed has no hybrid ZeRO-1/2; hybrid sharding needs stage3)")
        group = None
    train_kwargs["deepspeed"] = zero_config(stage, offload, group)
    notes.append(f"sharding {mix.sharding!r}: DeepSpeed ZeRO-{stage}" + (" with CPU offload" if offload else "")
                 + (f", ZeRO++ hpZ groups of {group}" if group else ""))


def check_fsdp_device(train_kwargs: dict, on_cpu: bool) -> None:
    if train_kwargs.get("fsdp") and on_cpu:
        raise ConfigError("FSDP runs through accelerate on GPUs only: on the CPU transformers' Trainer would "
                          "silently run plain data parallel instead; on CPU use the DeepSpeed engine "
                          "(sharding: stage2 or stage3, sharding_engine: deepspeed)", key="fsdp")


def check_deepspeed_installed() -> None:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("needs DeepSpeed: pip install 'mixtune[deepspeed]' (or sharding_engine: fsdp on GPUs)",
                          key="sharding")


def join_deepspeed(training_args) -> None:
    """Let DeepSpeed use the process group transformers started. On the CPU, TrainingArguments starts it
    without DeepSpeed (its `use_cpu` branch comes first), and ZeRO-3's partitioned model loading would then
    see a world of one; DeepSpeed adopts an existing torch.distributed group here."""
    if not training_args.deepspeed:
        return
    import deepspeed

    if deepspeed.comm.is_initialized():
        return
    if _dist() is None and "WORLD_SIZE" not in os.environ:
        # one process outside any launcher (the Python API; the CLI relaunches under torchrun instead): a
        # process group of one, rather than DeepSpeed's MPI discovery
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())}.items():
            os.environ.setdefault(key, value)
    backend = _dist().get_backend() if _dist() else "gloo" if training_args.use_cpu else "nccl"
    deepspeed.init_distributed(dist_backend=backend)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report_to_launcher(error: BaseException) -> None:
    """Under torchrun, write this rank's error where torchrun's failure summary reads it, so the summary
    names the bad file and sample instead of just an exit code."""
    if "TORCHELASTIC_ERROR_FILE" not in os.environ:
        return
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    try:
        ErrorHandler().record_exception(error)
    except Exception:  # the summary is a courtesy; the error itself is printed anyway
        pass


def has_tp_plan(model_type: str) -> bool:
    """Whether transformers ships a tensor-parallel plan for this model type's language model."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(model_type)
    except ValueError:
        return False
    return bool(getattr(config.get_text_config(), "base_model_tp_plan", None))


def check_tensor_parallel(mix, world: int, on_cpu: bool, sharded: bool) -> None:
    degree = mix.tensor_parallel_degree
    if degree == 1:
        return
    if sharded:
        raise ConfigError("tensor parallel together with sharding is not built in mixtune; use one of them",
                          key="tensor_parallel_degree")
    if world % degree:
        raise ConfigError(f"{degree} must divide the {world} process(es) launched", key="tensor_parallel_degree")
    if on_cpu and degree != world:
        raise ConfigError(f"on the CPU tensor parallel must span every process ({world}): tensor parallel beside "
                          "data parallel runs on GPUs only", key="tensor_parallel_degree")
    from mixtune.models.registry import families, read_model_type

    if not has_tp_plan(read_model_type(mix.model_name_or_path)):
        with_plan = sorted(f.name for f in families() if any(has_tp_plan(t) for t in f.model_types))
        raise ConfigError(f"this model's language model has no tensor-parallel plan (tp_plan) in transformers; "
                          f"families with one: {', '.join(with_plan)}", key="tensor_parallel_degree")
    if on_cpu:
        permit_cpu_tensor_parallel()


def permit_cpu_tensor_parallel() -> None:
    """Let accelerate take a tensor-parallel model on CPU processes (gloo).

    transformers' `tp_plan` splits the layers over a CPU device mesh and its DTensor collectives run on gloo,
    and the Trainer hands accelerate a ParallelismConfig(tp_size=N) so that every rank gets the same batches and
    nothing is wrapped in DDP; accelerate then refuses the config for any run whose type is MULTI_CPU (its
    check names GPU-like devices, FSDP2 and DeepSpeed). For pure tensor parallel (the TP size is the whole
    world, no data-parallel dimension for FSDP2 to take) mixtune validates that config as accelerate would for
    GPU processes; everything else, including the size checks, is accelerate's own. Tested against one
    process in tests/test_distributed.py."""
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DistributedType

    validate = ParallelismConfig._validate_accelerator
    if getattr(validate, "_mixtune_cpu_tp", False):
        return

    def validate_cpu_tensor_parallel(self, accelerator):
        state = accelerator.state
        if state.distributed_type != DistributedType.MULTI_CPU or self.tp_size != self.total_size:
            return validate(self, accelerator)
        state.distributed_type = DistributedType.MULTI_GPU  # only for the check: how GPU processes pass it
        try:
            return validate(self, accelerator)
        finally:
            state.distributed_type = DistributedType.MULTI_CPU

    validate_cpu_tensor_parallel._mixtune_cpu_tp = True
    ParallelismConfig._validate_accelerator = validate_cpu_tensor_parallel


def split_parameters(model) -> tuple[int, int]:
    """(parameters split across ranks as DTensors, all parameters): what tensor parallel / FSDP2 sharded."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    return sum(isinstance(p, DTensor) for p in params), len(params)
