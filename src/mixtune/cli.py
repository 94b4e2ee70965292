"""The `mixtune` command: one function per subcommand, parsing only; the work lives in the modules."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import NamedTuple

from mixtune.errors import MixtuneError

log = logging.getLogger("mixtune")


def cmd_train(args, extra: list[str]) -> int:
    from mixtune.config import load_config, parse_overrides
    from mixtune.train.distributed import is_main_process, needs_launcher, relaunch_under_torchrun, split_launch_flags

    launch, extra = split_launch_flags(extra)
    if not launch and needs_launcher(args.config, extra):  # DeepSpeed needs a process group, even of one
        launch = {"standalone": None, "nproc_per_node": "1"}
    if launch:  # `--nproc_per_node N` (and torchrun's other flags): run again as torchrun's workers
        return relaunch_under_torchrun(launch, [args.config] + extra)
    from mixtune.train.run import train

    config = load_config(args.config, parse_overrides(extra))
    metrics = train(config)
    if is_main_process():
        print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, indent=1))
    return 0


def cmd_keys(args, extra) -> int:
    from mixtune.config_keys import listing

    text, shown = listing(args.search)
    print(text, end="")
    return 0 if shown else 1


def cmd_init(args, extra) -> int:
    from mixtune.tools.starter import starter_config, write_starter

    text = starter_config(args.family, lora=args.lora, mixtoken=args.mixtoken)
    if not args.output:
        print(text, end="")
        return 0
    path = write_starter(text, args.output)
    print(f"starter config written to {path}: fill in model_name_or_path and data_files, then: mixtune train {path}")
    return 0


def cmd_doctor(args, extra) -> int:
    from mixtune.doctor import run_doctor

    return run_doctor(as_json=args.json)


def cmd_make_tiny_model(args, extra) -> int:
    from mixtune.models.registry import get_family

    family = get_family(args.family)
    family.check_requires()
    path = family.build_tiny(args.output_dir)
    print(f"tiny {args.family} checkpoint written to {path}")
    return 0


def cmd_list_models(args, extra) -> int:
    from mixtune.models.registry import support_table

    print(support_table())
    return 0


def cmd_make_demo_data(args, extra) -> int:
    from mixtune.tools.demo_data import make_demo_data

    counts = make_demo_data(args.output_dir, seed=args.seed)
    print(f"demo data written to {args.output_dir}: {counts}")
    return 0


class TaskDemo(NamedTuple):
    """`mixtune demo --task T`: a function in mixtune/tools/<module>.py taking (output_dir, overrides), or
    (task, output_dir, overrides) when one function serves several tasks; own_dir replaces the chat demo's
    default output folder (None: keep it)."""
    module: str
    function: str
    own_dir: str | None = None
    takes_task: bool = False


TASK_DEMOS = {
    "contrastive": TaskDemo("task_demo", "run_task_demo", takes_task=True),  # a tiny CLIP on the shapes
    "classification": TaskDemo("task_demo", "run_task_demo", takes_task=True),  # a tiny EVA02 (timm)
    "dpo": TaskDemo("pref_demo", "run_pref_demo", takes_task=True),  # after the chat demo's SFT, in its folder
    "grpo": TaskDemo("pref_demo", "run_pref_demo", takes_task=True),
    "segmentation": TaskDemo("seg_demo", "run_segmentation_demo", "runs/demo_segmentation"),  # tiny SAM
    "detection": TaskDemo("detection_demo", "run_detection_demo", "runs/demo_detection"),  # tiny GD / YOLO-World
    "text_to_audio": TaskDemo("audio_demo", "run_audio_demo", "runs/demo_audio"),  # tiny AudioLDM2, tone pitch
}


def cmd_demo(args, extra) -> int:
    from mixtune.config import parse_overrides
    from mixtune.tools.demo import run_demo

    if args.task != "chat":
        demo = TASK_DEMOS[args.task]
        run = getattr(importlib.import_module(f"mixtune.tools.{demo.module}"), demo.function)
        # the detection demo trains either detector family (Grounding DINO unless --family names the other)
        kwargs = {"family": args.family} if args.task == "detection" and args.family in ("yolo_world",) else {}
        own = "runs/demo_yolo_world" if kwargs else demo.own_dir
        out = own if own and args.output_dir == "runs/demo" else args.output_dir
        print(json.dumps(run(*[args.task] * demo.takes_task, out, parse_overrides(extra), **kwargs), indent=1))
        return 0
    if args.video:
        from mixtune.tools.video_demo import run_video_demo

        report = run_video_demo(args.family, args.output_dir if args.output_dir != "runs/demo" else "runs/demo_video",
                                parse_overrides(extra))
    else:
        report = run_demo(args.family, args.output_dir, parse_overrides(extra), lora=args.lora,
                          mixtoken=args.mixtoken)
    print(json.dumps({k: v for k, v in report.items() if k not in ("examples", "next_commands")}, indent=1))
    print("\nUse the trained model:\n" + "\n".join(f"  {c}" for c in report["next_commands"]))
    return 0


def cmd_merge_lora(args, extra) -> int:
    from mixtune.tools.merge_lora import merge_lora

    path = merge_lora(args.lora_path, args.merge_model_path, args.model_name_or_path, args.dtype)
    print(f"merged model written to {path}")
    return 0


def add_model_args(p) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder (with --lora_path: the base; default: the "
                   "adapter's own record)")
    p.add_argument("--lora_path", default=None, help="LoRA adapter folder, merged into the base in memory")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on a GPU, float32 on CPU), float32, bfloat16, "
                   "float16")
    p.add_argument("--chat_template", default=None, help="a Jinja or PaddleMIX chat_template.json file, as in training")


def add_generation_args(p, temperature: float = 0.0) -> None:
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=temperature, help="0: greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def generation_options(args):
    from mixtune.infer.engine import GenerationOptions

    return GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             num_beams=args.num_beams, repetition_penalty=args.repetition_penalty,
                             seed=args.seed).check()


def cmd_predict(args, extra) -> int:
    from mixtune.infer.engine import Engine
    from mixtune.infer.segment import is_segmentation_model, predict_segmentation_cli
    from mixtune.infer.predict import entries_from_args, model_from_config, predict, read_prompts

    entries, raw = entries_from_args(args.data_files, args.name, args.dataset, args.config, args.split)
    model, lora = args.model, args.lora_path
    if model is None and lora is None:
        if not raw:
            raise MixtuneError("--model is required (or --config, whose output_dir holds the trained model)")
        model, lora = model_from_config(raw)
    if is_segmentation_model(model, lora):  # SAM: masks as RLE results (infer/segment.py)
        return predict_segmentation_cli(model, lora, entries, args)
    options = generation_options(args)
    if is_detector(model, lora):  # boxes, not text: COCO results and drawn pictures
        from mixtune.infer.detection_predict import predict_detection

        print(json.dumps(predict_detection(model, entries, args.output_dir, args.draw, args.batch_size,
                                           args.threshold, lora, args.nms_iou), indent=1))
        return 0
    items = read_prompts(entries)
    engine = Engine.load(model, lora, args.dtype, chat_template=args.chat_template)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    summary = predict(engine, items, options, args.output_dir, args.batch_size, metrics)
    print(json.dumps(summary, indent=1))
    return 0


def is_detector(model: str | None, lora: str | None) -> bool:
    import os

    from mixtune.models.registry import family_for_checkpoint
    from mixtune.tools.merge_lora import read_adapter_config

    base = model or read_adapter_config(lora).get("base_model_name_or_path")
    # a local checkpoint only: anything else is for the chat engine to load (or to refuse) as before
    return bool(base) and os.path.isdir(base) and family_for_checkpoint(base).task == "detection"


def cmd_serve(args, extra) -> int:
    import os

    from mixtune.infer.engine import Engine

    try:
        from mixtune.serve.openai import ServeSettings, serve
    except ImportError as e:
        raise MixtuneError(f"mixtune serve needs FastAPI and uvicorn ({e}): pip install 'mixtune[serve]'") from None

    engine = Engine.load(args.model, args.lora_path, args.dtype, chat_template=args.chat_template)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model or args.lora_path))
    settings = ServeSettings(api_key=args.api_key or os.environ.get("MIXTUNE_API_KEY"),
                             allowed_local_media_path=args.allowed_local_media_path, served_model_name=name,
                             max_images=args.max_images, max_model_len=args.max_model_len,
                             batch_window_s=args.batch_window_ms / 1000, max_batch_size=args.max_batch_size)
    serve(engine, settings, args.host, args.port)
    return 0


def cmd_chat(args, extra) -> int:
    from mixtune.infer.chat import run_chat
    from mixtune.infer.engine import Engine

    options = generation_options(args)
    engine = Engine.load(args.model, args.lora_path, args.dtype, chat_template=args.chat_template)
    run_chat(engine, options, system=args.system, images=args.image)
    return 0


def cmd_export(args, extra) -> int:
    if args.format == "onnx":  # detection / segmentation checkpoints (mixtune/export_onnx/)
        from mixtune.export_onnx import export_onnx

        print(json.dumps(export_onnx(args.model, args.to), indent=1))
        return 0
    from mixtune.export import export

    report = export(args.model, args.to, args.lora_path, args.dtype)
    print(json.dumps(report, indent=1))
    print(f"serve it with: vllm serve {args.to}")
    return 0


TRAIN_EPILOG = """config keys (mixtune's own, transformers' TrainingArguments, PaddleMIX / PaddleNLP names,
dataset entry keys), each with its type, default and meaning:
  mixtune keys                   all of them, grouped
  mixtune keys --search lora     those whose name or meaning mentions a word
a commented starter config for a model family:
  mixtune init --family qwen2_vl [--lora] [--mixtoken] --output cfg.yaml
overrides: mixtune train cfg.yaml --learning_rate 2e-5 --max_steps 100"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixtune", description="Fine-tune multimodal models from one config.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune from a JSON or YAML config; --key value overrides any key",
                       epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.set_defaults(func=cmd_train, extra_ok=True)

    p = sub.add_parser("keys", help="every config key with its type, default and meaning (from the schema)")
    p.add_argument("--search", default=None, metavar="WORD", help="only keys whose name or meaning contains WORD")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("init", help="write a commented starter config for a model family (mixtune list-models)")
    p.add_argument("--family", required=True, help="a family name or checkpoint model_type, e.g. qwen2_vl, clip, timm")
    p.add_argument("--lora", action="store_true", help="LoRA adapters instead of full fine-tuning")
    p.add_argument("--mixtoken", action="store_true", help="MixToken packing (families that pack)")
    p.add_argument("--output", default=None, help="a new .yaml file; default: print the config")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("doctor", help="versions, GPU / bf16 / flash-attention / DeepSpeed / bitsandbytes / NPU, and "
                       "which features this install can run; exit 1 when the core install is broken")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("make-tiny-model", help="write a tiny random-weight checkpoint of a model family")
    p.add_argument("--family", default="qwen2_vl")
    p.add_argument("--output_dir", required=True)
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("list-models", help="the supported model families and what each supports")
    p.set_defaults(func=cmd_list_models)

    p = sub.add_parser("make-demo-data", help="draw the synthetic VQA + caption demo set")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_demo_data)

    p = sub.add_parser("merge-lora", help="fold a LoRA adapter into its base; save a full checkpoint + processor")
    p.add_argument("--model_name_or_path", default=None, help="base checkpoint; default: the adapter's own record")
    p.add_argument("--lora_path", required=True, help="adapter folder (adapter_config.json)")
    p.add_argument("--merge_model_path", required=True, help="new folder for the merged model")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the saved weights; auto: the base checkpoint's own")
    p.set_defaults(func=cmd_merge_lora)

    p = sub.add_parser("demo", help="tiny model + demo data + fine-tune + accuracy before and after")
    p.add_argument("--family", default="qwen2_vl")
    p.add_argument("--output_dir", default="runs/demo")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters, merge them, evaluate the merged model")
    p.add_argument("--mixtoken", action="store_true", help="train with MixToken packing")
    p.add_argument("--video", action="store_true", help="the video task: which way a square moves (video families)")
    p.add_argument("--task", default="chat",
                   choices=["chat", *TASK_DEMOS],
                   help="contrastive: tiny CLIP, retrieval recall; classification: tiny EVA02 (timm), top-1; "
                        "dpo / grpo: preference / RL tuning of the chat demo's model; "
                        "segmentation: tiny SAM, box prompts, mIoU; "
                        "detection: tiny Grounding DINO (--family yolo_world: tiny YOLO-World), COCO AP50; "
                        "text_to_audio: tiny AudioLDM2, pitch of tones")
    p.set_defaults(func=cmd_demo, extra_ok=True)

    p = sub.add_parser("predict", help="answer a dataset with a model; write predictions.jsonl and metrics")
    add_model_args(p)
    p.add_argument("--data_files", default=None, help="data file(s) of one dataset entry (with --name)")
    p.add_argument("--name", default=None, help="the entry's format (default chatml_dataset)")
    p.add_argument("--dataset", default=None, help='one dataset entry as JSON, e.g. \'{"name": "vqa", ...}\'')
    p.add_argument("--config", default=None, help="a training config: predict on its eval split")
    p.add_argument("--split", default="eval", choices=["eval", "train"], help="with --config")
    p.add_argument("--output_dir", default="predictions")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--metrics", default="exact_match,vqa_accuracy,bleu4,rouge_l,cider")
    p.add_argument("--draw", action="store_true", help="detection / segmentation: also write PNGs with the "
                   "predictions drawn (output_dir/drawn/)")
    p.add_argument("--threshold", type=float, default=0.3, help="with --draw: the lowest score drawn")
    p.add_argument("--nms_iou", type=float, default=None, help="detection: class-wise NMS at this IoU (Grounding "
                   "DINO: none by default, it is trained NMS-free; YOLO-World: its own NMS, default 0.7)")
    add_generation_args(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (POST /v1/chat/completions)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api_key", default=None, help="require 'Authorization: Bearer KEY' (or set MIXTUNE_API_KEY)")
    p.add_argument("--served_model_name", default=None, help="the model id clients name; default: the folder name")
    p.add_argument("--allowed_local_media_path", default=None, help="image files under this folder may be named "
                   "by path or file:// URL; otherwise only data: URIs")
    p.add_argument("--max_images", type=int, default=8, help="images per request")
    p.add_argument("--max_model_len", type=int, default=None, help="prompt + max_tokens limit; default: the model's")
    p.add_argument("--batch_window_ms", type=float, default=10, help="how long to collect requests into a batch")
    p.add_argument("--max_batch_size", type=int, default=16)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="talk to a model in the terminal; replies stream as they are generated")
    add_model_args(p)
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--image", action="append", default=None, help="an image for the first message (repeatable)")
    add_generation_args(p)
    p.set_defaults(func=cmd_chat, max_new_tokens=256)

    p = sub.add_parser("export", help="a folder serving engines load: hub key names, processor, chat template")
    p.add_argument("--model", default=None, help="checkpoint folder (with --lora_path: the base; default: the "
                   "adapter's own record)")
    p.add_argument("--lora_path", default=None, help="LoRA adapter folder, merged into the export")
    p.add_argument("--to", required=True, help="new folder for the export")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the saved weights; auto: the checkpoint's own")
    p.add_argument("--format", default="hf", choices=["hf", "onnx"], help="hf: a transformers folder; onnx: "
                   "ONNX graphs checked with onnxruntime (detection and segmentation families)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mixtune.train.distributed import RankFailed, is_main_process, log_format, quiet_replicas, report_to_launcher

    logging.basicConfig(level=logging.INFO, format=log_format(), datefmt="%H:%M:%S")
    # bitsandbytes' CPU backend warns at import (deepspeed and transformers import it) about an optional kernel
    # package; mixtune quantises on GPUs only
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    quiet_replicas()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "extra_ok", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args, extra)
    except MixtuneError as e:
        if is_main_process() or not isinstance(e, RankFailed):  # another rank's error: the main one says it
            print(f"mixtune: error: {e}", file=sys.stderr)
            report_to_launcher(e)
        return 2
