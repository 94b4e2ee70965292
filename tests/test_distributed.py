"""Many processes on the CPU (gloo, 1 thread each): 2 ranks x batch 2 are the same training as 1 process x
batch 4 under DDP, DeepSpeed ZeRO-2/3 and MixToken; errors on one rank stop every rank; the parallelism keys
become the right DeepSpeed / FSDP2 settings."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import write_json

from mixtune.config import build_config, load_config
from mixtune.errors import ConfigError
from mixtune.train import distributed as D

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (220, 220, 30)}
# reading a config checks that data files exist (this file does)
BASE = {"model_name_or_path": "some/model",
        "dataset": {"train": [{"name": "chatml_dataset", "data_files": os.path.abspath(__file__)}]}}


def varied_data(folder, n=16) -> str:
    """Samples of different lengths (image sizes, question and answer lengths), so batches pad and packs mix."""
    from PIL import Image

    records = []
    for i in range(n):
        name = list(COLOURS)[i % 4]
        Image.new("RGB", (56 + 28 * (i % 3), 56), COLOURS[name]).save(folder / f"img{i}.png")
        records.append({"image": f"img{i}.png", "conversations": [[
            "<image>What colour is the shape?" + " Please." * (i % 5), name + " it is" * (i % 2)]]})
    return write_json(folder / "train.json", records)


def config(folder, model_dir, out: str, **overrides) -> str:
    raw = {"model_name_or_path": model_dir, "dataset": {"train": [{"name": "chatml_dataset",
                                                                     "data_files": varied_data(folder)}]},
           "output_dir": str(folder / out), "per_device_train_batch_size": 4, "learning_rate": 1e-3,
           "max_steps": 3, "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True, "max_length": 512,
           "seed": 0, "lr_scheduler_type": "linear", "ddp_timeout": 120,
           # Adam divides by sqrt(v) + eps: a larger eps keeps near-zero gradients from magnifying the
           # (legitimate) rounding difference of summing a batch in two halves
           "adam_epsilon": 1e-3, **overrides}
    return write_json(folder / f"{out}.json", raw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch(cfg: str, *overrides: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """`mixtune train cfg --nproc_per_node N`: mixtune relaunches itself under torchrun."""
    cmd = [sys.executable, "-m", "mixtune", "train", cfg, "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "--per_device_train_batch_size",
           str(4 // nproc), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env())


def losses(out) -> list[tuple[int, float]]:
    return json.load(open(os.path.join(out, "metrics.json")))["train_loss"]


def assert_same_training(out_a, out_b, tol=1e-5):
    a, b = losses(out_a), losses(out_b)
    assert [s for s, _ in a] == [s for s, _ in b] and len(a) >= 3
    for (step, la), (_, lb) in zip(a, b):
        assert abs(la - lb) < tol, (step, la, lb)
    # read through plain transformers: DeepSpeed saves the live model's key names, save_model the hub's
    wa, wb = weights(out_a), weights(out_b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < tol, worst


def weights(model_dir) -> dict:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(model_dir)).state_dict()


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory):
    """The reference: one process, batch 4, trained in this process."""
    from mixtune.train.run import train

    folder = tmp_path_factory.mktemp("single")
    train(load_config(config(folder, tiny_model_dir("qwen2_vl"), "out")))
    return folder, str(folder / "out")


def logits_of(model_dir: str, image_path: str) -> torch.Tensor:
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[Image.open(image_path)], return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


# ---- two processes equal one -----------------------------------------------------------------------------

@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process(single, tiny_model_dir, tmp_path):
    ref_folder, ref_out = single
    run = launch(config(tmp_path, tiny_model_dir("qwen2_vl"), "out"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_training(ref_out, tmp_path / "out")


@pytest.mark.parametrize("stage", [pytest.param("stage2", marks=pytest.mark.slow), "stage3"])
def test_zero_two_ranks_equal_one_process_and_output_loads_in_transformers(single, tiny_model_dir, tmp_path, stage):
    ref_folder, ref_out = single
    # stage2 in PaddleMIX's form, with its sharding_parallel_degree
    run = launch(config(tmp_path, tiny_model_dir("qwen2_vl"), "out", sharding=stage, sharding_parallel_degree=2))
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"DeepSpeed ZeRO-{stage[-1]}" in run.stderr
    assert_same_training(ref_out, tmp_path / "out")
    assert run.stdout.count('"train_loss"') == 1  # the final metrics are printed by the main process only
    # replicas log no progress lines (other libraries' warnings, e.g. bitsandbytes' on import, may appear)
    assert not [line for line in run.stderr.splitlines() if line.startswith("[rank 1] ") and " mixtune: " in line]
    # the consolidated output (ZeRO-3 gathers its shards on save) is a plain transformers folder
    image = str(tmp_path / "img0.png")
    assert (logits_of(str(tmp_path / "out"), image) - logits_of(ref_out, image)).abs().max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("sharding", [None, "stage3"])
def test_llava_two_ranks_equal_one_process(tiny_model_dir, tmp_path, sharding):
    from mixtune.train.run import train

    model = tiny_model_dir("llava")
    train(load_config(config(tmp_path, model, "one")))
    run = launch(config(tmp_path, model, "two", **({"sharding": sharding} if sharding else {})))
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_training(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_mixtoken_under_ddp_equals_one_process(tiny_model_dir, tmp_path):
    from mixtune.train.run import train

    model = tiny_model_dir("qwen2_vl")
    # 16 samples pack into 8 rows of 120 tokens: 2 global batches of 4 rows per epoch, 2 epochs (re-packed)
    common = dict(mixtoken=True, max_length=120, max_steps=4)
    train(load_config(config(tmp_path, model, "one", **common)))
    run = launch(config(tmp_path, model, "two", **common))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "packed into 8 rows" in run.stderr
    assert_same_training(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_resume_from_zero3_checkpoint_equals_uninterrupted_run(tiny_model_dir, tmp_path):
    import shutil

    model = tiny_model_dir("qwen2_vl")
    common = dict(sharding="stage3", max_steps=6, save_strategy="steps", save_steps=3)
    run = launch(config(tmp_path, model, "full", **common))
    assert run.returncode == 0, run.stderr[-3000:]
    assert os.path.isdir(tmp_path / "full" / "checkpoint-3" / "global_step3")  # DeepSpeed's sharded state
    (tmp_path / "part").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "part" / "checkpoint-3")
    run = launch(config(tmp_path, model, "part", resume_from_checkpoint=True, **common))
    assert run.returncode == 0, run.stderr[-3000:]
    full = dict(losses(tmp_path / "full"))
    resumed = dict(losses(tmp_path / "part"))
    for step in (4, 5, 6):
        assert abs(resumed[step] - full[step]) < 1e-5, step
    wa, wb = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


@pytest.mark.slow
def test_two_nodes_on_one_box_equal_one_process(single, tiny_model_dir, tmp_path):
    """Two torchrun launches, one process each, meeting through a c10d rendezvous on 127.0.0.1."""
    ref_folder, ref_out = single
    cfg = config(tmp_path, tiny_model_dir("qwen2_vl"), "out", per_device_train_batch_size=2)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "mixtune", "train", cfg, "--nnodes", "2", "--node_rank",
                               str(rank), "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                               endpoint, "--rdzv_id", "mixtune-test"], env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert_same_training(ref_out, tmp_path / "out")


# ---- one rank's failure stops every rank ----------------------------------------------------------------

@pytest.mark.slow
def test_bad_sample_found_by_the_main_scan_stops_every_rank_with_file_and_index(tiny_model_dir, tmp_path):
    cfg = config(tmp_path, tiny_model_dir("qwen2_vl"), "out")
    records = json.load(open(tmp_path / "train.json"))
    records[5]["image"] = "ghost.png"
    write_json(tmp_path / "train.json", records)
    start = time.monotonic()
    run = launch(cfg)
    assert run.returncode != 0
    assert time.monotonic() - start < 120
    assert "mixtune: error: " in run.stderr and "train.json, sample 5, field 'image': image not found" in run.stderr
    assert "exitcode  : 2" in run.stderr  # a user error (mixtune's exit code 2), not a crash or a timeout
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


def _rank_body(rank: int, port: int, folder: str) -> None:
    """One of two gloo processes: the main process's block fails; the other must stop with its message."""
    import torch.distributed as dist

    from mixtune.errors import DataError

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    outcome = "finished"
    try:
        with D.main_process_first():
            open(os.path.join(folder, f"ran{rank}"), "w").close()
            if D.is_main_process():
                raise DataError("image not found", file="train.json", index=5)
    except Exception as e:
        outcome = f"{type(e).__name__}: {e}"
    D.barrier()  # both ranks reach the same collectives afterwards: nothing was left waiting
    with open(os.path.join(folder, f"outcome{rank}"), "w") as f:
        f.write(outcome)
    dist.destroy_process_group()


def test_an_error_in_the_main_processs_block_stops_the_other_rank_with_the_same_message(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_body, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    outcomes = [(tmp_path / f"outcome{r}").read_text() for r in (0, 1)]
    assert outcomes[0] == "DataError: train.json, sample 5: image not found"
    assert outcomes[1] == "RankFailed: train.json, sample 5: image not found"
    assert (tmp_path / "ran0").exists() and not (tmp_path / "ran1").exists()  # rank 1 never ran its block


@pytest.mark.slow
def test_sample_failing_in_one_ranks_shard_stops_all_ranks(tiny_model_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MIXTUNE_CACHE_DIR", str(cache))
    model = tiny_model_dir("qwen2_vl")
    launch(config(tmp_path, model, "first", max_steps=1))  # measures and caches every sample's length
    cfg = config(tmp_path, model, "second", max_steps=4)
    (tmp_path / "img5.png").write_bytes(b"not an image")  # changed after the scan: only one rank loads it
    start = time.monotonic()
    run = launch(cfg, timeout=200)
    assert run.returncode != 0
    assert time.monotonic() - start < 150
    assert "train.json, sample 5, field 'image': cannot decode image" in run.stderr


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_in_bounded_time(tiny_model_dir, tmp_path):
    cfg = config(tmp_path, tiny_model_dir("qwen2_vl"), "out", max_steps=100000, logging_steps=1)
    cmd = [sys.executable, "-m", "mixtune", "train", cfg, "--nproc_per_node", "2", "--master_port",
           str(free_port()), "--per_device_train_batch_size", "2"]
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log:
        launcher = subprocess.Popen(cmd, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 200
        while "'loss'" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "'loss'" in log_path.read_text(), log_path.read_text()[-3000:]
        victim = rank_pid(1)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        launcher.wait(timeout=120)
        assert launcher.returncode != 0
        assert time.monotonic() - killed_at < 120
        assert rank_pid(0, required=False) is None  # the surviving rank is gone too
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)


def rank_pid(rank: int, required: bool = True) -> int | None:
    """The pid of this test's torchrun worker of `rank` (found by its environment)."""
    marker = os.environ["MIXTUNE_CACHE_DIR"].encode()
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"RANK={rank}".encode() in environ and f"MIXTUNE_CACHE_DIR={marker.decode()}".encode() in environ \
                and b"LOCAL_RANK=%d" % rank in environ:
            return int(pid)
    if required:
        raise AssertionError(f"no rank {rank} process found")
    return None


# ---- the parallelism keys --------------------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [
    ("stage1", (1, False)), ("stage2", (2, False)), ("stage3 offload", (3, True)), (["stage2", "offload"], (2, True)),
    ("stage2,offload", (2, True)), ("", (0, False)),
])
def test_sharding_forms(value, expected):
    assert D.parse_sharding(value) == expected


@pytest.mark.parametrize("value,message", [("stage4", "unknown sharding option 'stage4'"),
                                           ("stage1 stage2", "give one stage"), ("offload", "needs a stage")])
def test_bad_sharding_forms_are_refused(value, message):
    with pytest.raises(ConfigError, match=message):
        D.parse_sharding(value)


def test_sharding_stage2_generates_the_deepspeed_config():
    cfg = build_config({**BASE, "sharding": "stage2 offload", "sharding_parallel_degree": 1})
    zero = cfg.training.deepspeed["zero_optimization"]
    assert zero["stage"] == 2 and zero["offload_optimizer"]["device"] == "cpu" and "offload_param" not in zero
    assert cfg.training.hf_deepspeed_config.is_zero2()
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # the config registers itself globally; later model loads must not see it


def translate(monkeypatch, world: int, use_cpu: bool = True, **keys) -> tuple[dict, list[str]]:
    from mixtune.config import MixtuneArgs

    monkeypatch.setenv("WORLD_SIZE", str(world))
    kwargs, notes = {"use_cpu": use_cpu}, []
    D.apply_parallelism(MixtuneArgs(model_name_or_path="m", dataset={"train": []}, **keys), kwargs, notes)
    return kwargs, notes


def test_zero3_offload_and_hybrid_sharding(monkeypatch):
    kwargs, notes = translate(monkeypatch, 4, sharding="stage3 offload", sharding_parallel_degree=2)
    zero = kwargs["deepspeed"]["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    assert zero["zero_hpz_partition_size"] == 2  # ZeRO++ hpZ: weights sharded within groups of 2
    assert zero["stage3_gather_16bit_weights_on_model_save"]  # the final output is consolidated
    for degree in (4, -1, 1):  # the whole world: plain ZeRO-3
        kwargs, _ = translate(monkeypatch, 4, sharding="stage3", sharding_parallel_degree=degree)
        assert "zero_hpz_partition_size" not in kwargs["deepspeed"]["zero_optimization"]
    kwargs, notes = translate(monkeypatch, 4, sharding="stage2", sharding_parallel_degree=2)
    assert any("ZeRO-2 shards optimizer state across all 4 ranks" in n for n in notes)
    with pytest.raises(ConfigError, match="3 must divide the 4 process"):
        translate(monkeypatch, 4, sharding="stage3", sharding_parallel_degree=3)
    kwargs, _ = translate(monkeypatch, 2, sharding="stage3", sharding_parallel_degree=8)  # written for 8 GPUs
    assert "zero_hpz_partition_size" not in kwargs["deepspeed"]["zero_optimization"]


def test_an_explicit_deepspeed_file_wins(monkeypatch):
    from mixtune.config import MixtuneArgs

    kwargs, notes = {"deepspeed": "ds.json"}, []
    D.apply_parallelism(MixtuneArgs(model_name_or_path="m", sharding="stage3"), kwargs, notes)
    assert kwargs["deepspeed"] == "ds.json" and any("'deepspeed' settings given win" in n for n in notes)


def test_fsdp_settings_on_gpu_and_refusal_on_cpu(monkeypatch):
    kwargs, _ = translate(monkeypatch, 4, use_cpu=False, sharding="stage3 offload", sharding_engine="fsdp",
                          sharding_parallel_degree=2)
    assert kwargs["fsdp"] is True
    assert kwargs["fsdp_config"]["version"] == 2 and kwargs["fsdp_config"]["reshard_after_forward"] is True
    assert kwargs["fsdp_config"]["cpu_offload"] is True
    pc = kwargs["parallelism_config"]  # HSDP: shard within 2 ranks, replicate across 2 groups
    assert (pc.dp_shard_size, pc.dp_replicate_size) == (2, 2)
    kwargs, _ = translate(monkeypatch, 2, use_cpu=False, sharding="stage2", sharding_engine="fsdp")
    assert kwargs["fsdp_config"]["reshard_after_forward"] is False and "parallelism_config" not in kwargs
    # on the CPU, accelerate would silently run plain DDP: refused instead
    with pytest.raises(ConfigError, match="silently run plain data parallel"):
        translate(monkeypatch, 2, sharding="stage3", sharding_engine="fsdp")
    with pytest.raises(ConfigError, match="FSDP runs through accelerate on GPUs only"):
        build_config({**BASE, "fsdp": "full_shard", "device": "cpu"})


@pytest.mark.parametrize("keys,message", [
    ({"pipeline_parallel_degree": 2}, "sharding: \"stage3\" \\(DeepSpeed ZeRO-3.*FSDP2"),
    ({"device": "npu"}, "'npu' needs the torch_npu package"),
    ({"sharding_engine": "megatron", "sharding": "stage2"}, "must be one of"),
])
def test_refusals_say_what_to_do(keys, message):
    with pytest.raises(ConfigError, match=message):
        build_config({**BASE, **keys})


# ---- launching and the rank helpers ----------------------------------------------------------------------

def test_launch_flags_are_split_from_config_overrides():
    launch_flags, rest = D.split_launch_flags(["--nproc_per_node", "2", "--learning_rate", "1e-4", "--nnodes=2",
                                               "--rdzv_endpoint", "host:29400", "--node_rank", "1", "--standalone"])
    assert launch_flags == {"nproc_per_node": "2", "nnodes": "2", "rdzv_endpoint": "host:29400", "node_rank": "1",
                            "standalone": None}
    assert rest == ["--learning_rate", "1e-4"]
    cmd = D.torchrun_command(launch_flags, ["cfg.json"] + rest)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in cmd
    assert cmd[-6:] == ["-m", "mixtune", "train", "cfg.json", "--learning_rate", "1e-4"]


def test_main_process_first_raises_the_error_in_one_process():
    ran = []
    with pytest.raises(ConfigError, match="boom"):
        with D.main_process_first():
            ran.append(1)
            raise ConfigError("boom")
    assert ran == [1] and D.is_main_process() and D.world_size() == 1


def test_paddlemix_sharding_keys_run_as_zero2(monkeypatch):
    kwargs, notes = translate(monkeypatch, 2, sharding="stage2", sharding_parallel_degree=2,
                              tensor_parallel_degree=1, pipeline_parallel_degree=1)
    assert kwargs["deepspeed"]["zero_optimization"]["stage"] == 2


def test_tensor_parallel_needs_a_tp_plan_and_on_cpu_every_process(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="on the CPU tensor parallel must span every process"):
        translate(monkeypatch, 4, tensor_parallel_degree=2)
    write_json(tmp_path / "config.json", {"model_type": "blip-2"})
    from mixtune.config import MixtuneArgs

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"no tensor-parallel plan.*families with one: .*qwen2_vl"):
        D.apply_parallelism(MixtuneArgs(model_name_or_path=str(tmp_path), tensor_parallel_degree=2),
                            {"use_cpu": False}, [])
    write_json(tmp_path / "config.json", {"model_type": "qwen2_vl"})
    kwargs = {"use_cpu": False}
    D.apply_parallelism(MixtuneArgs(model_name_or_path=str(tmp_path), tensor_parallel_degree=2), kwargs, [])
    assert "deepspeed" not in kwargs and "fsdp" not in kwargs  # transformers' tp_plan does it at load time


@pytest.mark.slow
def test_lora_under_zero3_saves_a_peft_adapter_that_equals_one_process_and_merges(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mixtune.cli import main
    from mixtune.train.run import train

    base_dir = tiny_model_dir("qwen2_vl")
    common = dict(lora=True, learning_rate=1e-2, lora_dropout=0.0)  # dropout masks differ per rank
    train(load_config(config(tmp_path, base_dir, "one", **common)))
    run = launch(config(tmp_path, base_dir, "two", sharding="stage3", **common))
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert all(abs(la - lb) < 1e-5 for (_, la), (_, lb) in zip(a, b)) and len(a) == len(b) == 3

    processor = AutoProcessor.from_pretrained(base_dir)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[Image.open(tmp_path / "img0.png")], return_tensors="pt")

    def adapter_logits(out):
        base = AutoModelForImageTextToText.from_pretrained(base_dir).eval()
        with torch.no_grad():
            return PeftModel.from_pretrained(base, str(out)).eval()(**inputs).logits

    one, two = adapter_logits(tmp_path / "one"), adapter_logits(tmp_path / "two")
    base = AutoModelForImageTextToText.from_pretrained(base_dir).eval()
    with torch.no_grad():
        assert (two - base(**inputs).logits).abs().max() > 1e-3  # the adapter trained: the test can fail
    assert (two - one).abs().max() < 1e-4
    merged_dir = str(tmp_path / "merged")
    assert main(["merge-lora", "--lora_path", str(tmp_path / "two"), "--merge_model_path", merged_dir,
                 "--model_name_or_path", base_dir, "--dtype", "float32"]) == 0
    with torch.no_grad():
        merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()(**inputs).logits
    assert (merged - two).abs().max() < 1e-5


def test_lora_init_is_seeded_so_every_rank_and_run_starts_alike(tiny_model_dir, tmp_path):
    from mixtune.train.run import build_trainer

    def adapters():
        trainer = build_trainer(load_config(config(tmp_path, tiny_model_dir("qwen2_vl"), "out", lora=True)))
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_A" in n}

    first, second = adapters(), adapters()
    assert first and all(torch.equal(first[n], second[n]) for n in first)


@pytest.mark.slow
def test_zero3_with_frozen_vision_and_per_entry_eval_equals_one_process(tiny_model_dir, tmp_path):
    from mixtune.train.run import train

    model = tiny_model_dir("qwen2_vl")
    records = json.load(open(varied_data(tmp_path)))
    evals = [{"name": "chatml_dataset", "data_files": write_json(tmp_path / f"{name}.json", part)}
             for name, part in (("val_a", records[:4]), ("val_b", records[4:10]))]
    common = dict(freeze_vision=True, eval_strategy="steps", eval_steps=3,
                  dataset={"train": [{"name": "chatml_dataset", "data_files": str(tmp_path / "train.json")}],
                           "eval": evals})
    # eval batches too: 2 x 1 against 1 x 2 (transformers normalises an eval batch's loss by the label
    # tokens of all ranks' batches, as in training)
    train(load_config(config(tmp_path, model, "one", per_device_eval_batch_size=2, **common)))
    run = launch(config(tmp_path, model, "two", sharding="stage3", per_device_eval_batch_size=1, **common))
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_training(tmp_path / "one", tmp_path / "two")
    one, two = (json.load(open(tmp_path / o / "metrics.json"))["final"] for o in ("one", "two"))
    for key in ("eval_val_a_loss", "eval_val_b_loss", "eval_loss"):
        assert abs(one[key] - two[key]) < 1e-5, key
    base, trained = weights(model), weights(tmp_path / "two")
    visual = [k for k in base if "visual" in k and "merger" not in k]
    assert visual and all(torch.equal(base[k], trained[k]) for k in visual)  # the frozen tower is untouched
    assert any(not torch.equal(base[k], trained[k]) for k in base if "language_model" in k)


@pytest.mark.slow
def test_sharding_without_a_launcher_runs_one_process_under_torchrun(single, tiny_model_dir, tmp_path):
    """`mixtune train cfg` with `sharding` (DeepSpeed needs a process group, even of one): same training."""
    ref_folder, ref_out = single
    cfg = config(tmp_path, tiny_model_dir("qwen2_vl"), "out", sharding="stage3 offload")
    run = subprocess.run([sys.executable, "-m", "mixtune", "train", cfg], capture_output=True, text=True,
                         timeout=300, env=env())
    assert run.returncode == 0, run.stderr[-3000:]
    assert "torch.distributed.run --standalone --nproc_per_node 1" in run.stderr
    assert "ZeRO-3 with CPU offload" in run.stderr
    assert_same_training(ref_out, tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("sharding", [None, "stage3"])
def test_generation_eval_on_two_ranks_equals_one_process(tiny_model_dir, tmp_path, sharding):
    """DDP deals the prompts' batches out to the ranks; ZeRO-3 answers them in lockstep (every forward gathers
    weights from both ranks): either way the same predictions and scores as one process, written once."""
    from mixtune.train.run import train

    model = tiny_model_dir("qwen2_vl")
    records = json.load(open(varied_data(tmp_path)))
    val = write_json(tmp_path / "val.json", records[:5])
    common = dict(eval_strategy="steps", eval_steps=3, eval_with_do_generation=True, generation_max_new_tokens=3,
                  per_device_eval_batch_size=2,
                  dataset={"train": [{"name": "chatml_dataset", "data_files": str(tmp_path / "train.json")}],
                           "eval": [{"name": "chatml_dataset", "data_files": val}]})
    train(load_config(config(tmp_path, model, "one", **common)))
    run = launch(config(tmp_path, model, "two", **common, **({"sharding": sharding} if sharding else {})))
    assert run.returncode == 0, run.stderr[-3000:]
    step = os.path.join("generation_eval", "step-3", "predictions.jsonl")
    one, two = (open(tmp_path / o / step).read() for o in ("one", "two"))
    assert one == two and one.count("\n") == 5
    a, b = (json.load(open(tmp_path / o / "metrics.json"))["final"] for o in ("one", "two"))
    assert a["eval_exact_match"] == b["eval_exact_match"] and a["eval_rouge_l"] == b["eval_rouge_l"]


@pytest.mark.slow
def test_tensor_parallel_two_ranks_on_cpu_equal_one_process(single, tiny_model_dir, tmp_path):
    """transformers' tp_plan splits Qwen2-VL's language model over 2 gloo ranks, each seeing the whole batch
    of 4: per-step loss and final (consolidated) weights equal one process with batch 4."""
    ref_folder, ref_out = single
    run = launch(config(tmp_path, tiny_model_dir("qwen2_vl"), "out", tensor_parallel_degree=2),
                 "--per_device_train_batch_size", "4")
    assert run.returncode == 0, run.stderr[-3000:]
    split = re.search(r"tensor parallel: (\d+) of (\d+) weight tensors split across 2 ranks", run.stderr)
    assert split and int(split.group(1)) > 0, run.stderr[-3000:]  # the layers really were split
    assert_same_training(ref_out, tmp_path / "out")


def _fsdp_on_cpu_rank(rank: int, port: int, folder: str) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ACCELERATE_USE_FSDP="true")
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    accelerator = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    with open(os.path.join(folder, f"type{rank}"), "w") as f:
        f.write(str(accelerator.distributed_type))


def test_accelerate_still_runs_no_fsdp_on_cpu_processes_so_mixtune_refuses_it(tmp_path):
    """The premise of the FSDP refusal on the CPU: given an FSDP2 plugin (and ACCELERATE_USE_FSDP), accelerate
    sets up 2 CPU processes as plain multi-CPU data parallel. When a release enables FSDP there, this fails and
    the refusal in distributed.check_fsdp_device can go."""
    import torch.multiprocessing as mp

    mp.spawn(_fsdp_on_cpu_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"type{r}").read_text() for r in (0, 1)] == ["DistributedType.MULTI_CPU"] * 2
