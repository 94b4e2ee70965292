"""The `mixtune` command: one function per subcommand, parsing only; the work lives in the modules."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from mixtune.errors import MixtuneError

log = logging.getLogger("mixtune")


def cmd_train(args, extra: list[str]) -> int:
    from mixtune.config import load_config, parse_overrides
    from mixtune.train.distributed import is_main_process, relaunch_under_torchrun, split_launch_flags

    launch, extra = split_launch_flags(extra)
    if launch:  # `--nproc_per_node N` (and torchrun's other flags): run again as torchrun's workers
        return relaunch_under_torchrun(launch, [args.config] + extra)
    from mixtune.train.run import train

    config = load_config(args.config, parse_overrides(extra))
    metrics = train(config)
    if is_main_process():
        print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, indent=1))
    return 0


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


def cmd_demo(args, extra) -> int:
    from mixtune.config import parse_overrides
    from mixtune.tools.demo import run_demo

    report = run_demo(args.family, args.output_dir, parse_overrides(extra), lora=args.lora, mixtoken=args.mixtoken)
    print(json.dumps({k: v for k, v in report.items() if k != "examples"}, indent=1))
    return 0


def cmd_merge_lora(args, extra) -> int:
    from mixtune.tools.merge_lora import merge_lora

    path = merge_lora(args.lora_path, args.merge_model_path, args.model_name_or_path, args.dtype)
    print(f"merged model written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixtune", description="Fine-tune multimodal models from one config.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune from a JSON or YAML config; --key value overrides any key")
    p.add_argument("config")
    p.set_defaults(func=cmd_train, extra_ok=True)

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
    p.set_defaults(func=cmd_demo, extra_ok=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mixtune.train.distributed import RankFailed, is_main_process, log_format, quiet_replicas, \
        report_to_launcher

    logging.basicConfig(level=logging.INFO, format=log_format(), datefmt="%H:%M:%S")
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
