"""Data pipeline throughput beside the model's step rate, on `mixtune make-demo-data` data.

Prints: the length scan (first run, and served from the cache), the loader's samples/s (decode + encode +
collate) with 0 and N workers, and the tiny model's training steps/s and samples/s at the same batch size.
The loader is not the bottleneck when its samples/s exceeds the model's. Threads are pinned to 1 per process.

    PYTHONPATH=src python benchmarks/data_pipeline.py [--family qwen2_vl] [--images 200] [--batch 8] [--workers 1]

With `--video mp4` (or `--video folders`) the data is `mixtune demo --video`'s moving-square clips (8 frames of
112x112 each), as mp4 files decoded by PyAV or as frame folders, and the loader line also gives decoded frames/s.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


def loader_rate(dataset, collate, batch: int, workers: int, n_batches: int) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                         collate_fn=collate, generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch / (time.perf_counter() - start)


def model_rate(model, dataset, collate, batch: int, n_steps: int) -> float:
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = [collate([dataset[(s * batch + i) % len(dataset)] for i in range(batch)]) for s in range(n_steps + 1)]
    model.train()

    def step(inputs):
        loss = model(**inputs).loss
        loss.backward()
        optim.step()
        optim.zero_grad()

    step(batches[0])  # warm-up
    start = time.perf_counter()
    for inputs in batches[1:]:
        step(inputs)
    return n_steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", default="qwen2_vl")
    parser.add_argument("--images", type=int, default=200, help="demo train images (5 samples each)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--video", choices=["mp4", "folders"], default=None,
                        help="benchmark video samples (--images then counts videos)")
    args = parser.parse_args()

    from mixtune.data.collate import PadCollator
    from mixtune.data.dataset import build_split
    from mixtune.models.registry import get_family
    from mixtune.tools.demo_data import make_demo_data
    from mixtune.models.loading import load_model_and_processor

    root = tempfile.mkdtemp(prefix="mixtune_bench_")
    family = get_family(args.family)
    model_dir = family.build_tiny(os.path.join(root, "model"))
    _, model, processor = load_model_and_processor(model_dir)
    frames = 0
    if args.video:
        from mixtune.tools.video_demo import FRAMES, VIDEO_KEYS

        entries = [{"name": "chatml_dataset", "data_files": video_data(root, args.images, args.video), **VIDEO_KEYS}]
        frames = FRAMES
    else:
        make_demo_data(os.path.join(root, "data"), n_train_images=args.images, n_val_images=8)
        entries = [{"name": "chatml_dataset", "data_files": os.path.join(root, "data", "train.json")}]
    cache = os.path.join(root, "cache")

    start = time.perf_counter()
    ds = build_split(entries, "train", processor, family, 512, root, cache_dir=cache)
    scan_s = time.perf_counter() - start
    start = time.perf_counter()
    build_split(entries, "train", processor, family, 512, root, cache_dir=cache)
    cached_s = time.perf_counter() - start
    lengths = ds.lengths()
    collate = PadCollator(processor.tokenizer.pad_token_id, family.collate_media)

    kind = f"video ({args.video}, {frames} frames each)" if args.video else "demo"
    print(f"\nfamily {family.name}, {len(ds)} {kind} samples, {sum(lengths) / len(lengths):.0f} tokens/sample "
          f"on average, batch {args.batch}, 1 thread per process, {os.cpu_count()} CPUs")
    print(f"length scan, first run:  {scan_s:6.2f} s  ({len(ds) / scan_s:7.1f} samples/s, encodes every sample)")
    print(f"length scan, cached:     {cached_s:6.2f} s  (parse + hash + cache read)")
    for workers in sorted({0, args.workers}):
        rate = loader_rate(ds, collate, args.batch, workers, args.batches)
        decoded = f", {rate * frames:7.1f} decoded frames/s" if frames else ""
        print(f"loader, {workers} worker(s):     {rate:7.1f} samples/s  ({rate / args.batch:6.2f} batches/s{decoded})")
    steps = model_rate(model, ds, collate, args.batch, max(5, args.batches // 3))
    print(f"model train step:        {steps * args.batch:7.1f} samples/s  ({steps:6.2f} steps/s, fwd+bwd+AdamW, fp32)")


def video_data(root: str, n: int, kind: str) -> str:
    """`mixtune demo --video`'s clips; with kind "mp4" each frame folder is also written as an mp4 (PyAV)."""
    import json

    import numpy as np
    from PIL import Image

    from mixtune.tools.video_demo import make_video_demo_data

    data = os.path.join(root, "data")
    make_video_demo_data(data, n_train=n, n_val=4)
    path = os.path.join(data, "train.json")
    if kind == "mp4":
        import av

        records = json.load(open(path))
        for r in records:
            folder = os.path.join(data, r["video"])
            with av.open(folder + ".mp4", "w") as out:
                stream = out.add_stream("mpeg4", rate=4)
                stream.width = stream.height = 112
                stream.pix_fmt = "yuv420p"
                for name in sorted(os.listdir(folder)):
                    frame = np.asarray(Image.open(os.path.join(folder, name)).convert("RGB"))
                    out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
                out.mux(stream.encode())
            r["video"] += ".mp4"
        path = os.path.join(data, "train_mp4.json")
        json.dump(records, open(path, "w"))
    return path


if __name__ == "__main__":
    main()
