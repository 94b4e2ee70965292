"""Loader workers by default, so that encoding the next batch (images decoded and processed, text
tokenised, rows packed) overlaps the current step's compute instead of running inside it.

transformers defaults `dataloader_num_workers` to 0. mixtune's default is `default_loader_workers()`:
min(4, the CPUs each training process gets - 1), 0 where a process has a single CPU; a value the user
writes wins (0 included). What workers do not change: the order of samples (the sampler runs in the main
process), bad-sample counting (skips are found and counted by the length scan before training, in the main
process, whatever loads the samples), and resumption (the Trainer seeds each worker from the run's seed).
"""

from __future__ import annotations

import os

MAX_DEFAULT_WORKERS = 4


def available_cpus() -> int:
    """CPUs this process may run on (its affinity, e.g. a container's or taskset's share), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_loader_workers(cpus: int | None = None, processes: int | None = None) -> int:
    """Loader workers per training process: one CPU stays with the process's own compute."""
    cpus = available_cpus() if cpus is None else cpus
    processes = processes if processes is not None else int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    per_process = cpus // max(processes, 1)
    return max(0, min(MAX_DEFAULT_WORKERS, per_process - 1))


def apply_loader_default(train_kwargs: dict, notes: list[str]) -> None:
    """Set `dataloader_num_workers` unless the config set it."""
    if "dataloader_num_workers" in train_kwargs:
        return
    workers = default_loader_workers()
    train_kwargs["dataloader_num_workers"] = workers
    notes.append(f"dataloader_num_workers: {workers} (default: min({MAX_DEFAULT_WORKERS}, CPUs per process - 1) "
                 f"with {available_cpus()} CPU(s); set it to override)")
