"""Load on `mixtune serve` (127.0.0.1 only, bounded): requests/s and p50 / p95 latency at concurrency 1, 4
and 16, the batching server (requests collected for 10 ms, batches up to 16) against one request at a time
(max_batch_size 1), on a tiny random Qwen2-VL with one image and a 16-token greedy reply per request.

    .venv/bin/python benchmarks/serve_load.py [--requests_per_client 4] [--threads 1]

The server runs in its own process with torch limited to `--threads` threads; prints a table and RESULT lines.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch_size: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "mixtune", "serve", "--model", model, "--port", str(port),
                             "--served_model_name", "tiny", "--max_batch_size", str(max_batch_size)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the server did not start within 180 s")


def request_body(i: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (96 + 8 * (i % 4), 96), ((40 * i) % 255, 120, 200)).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return json.dumps({"model": "tiny", "temperature": 0, "max_tokens": 16, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "What colour is the shape?"}]}]
    }).encode()


def one_request(url: str, body: bytes) -> float:
    start = time.perf_counter()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        json.loads(r.read())
    return time.perf_counter() - start


def load(url: str, concurrency: int, per_client: int) -> dict:
    bodies = [request_body(i) for i in range(concurrency * per_client)]
    one_request(url, bodies[0])  # warm-up

    def client(k):
        return [one_request(url, bodies[k * per_client + j]) for j in range(per_client)]

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = [t for ts in pool.map(client, range(concurrency)) for t in ts]
    wall = time.perf_counter() - start
    latencies.sort()
    return {"requests": len(latencies), "rps": len(latencies) / wall, "p50": statistics.median(latencies),
            "p95": latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests_per_client", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--concurrency", default="1,4,16")
    args = parser.parse_args()
    from mixtune.models.registry import get_family

    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = get_family("qwen2_vl").build_tiny(os.path.join(tmp, "tiny"))
        rows = []
        for mode, batch in (("batched", 16), ("one-at-a-time", 1)):
            proc, url = start_server(model, batch, args.threads)
            try:
                for c in levels:
                    r = load(url, c, args.requests_per_client)
                    rows.append((mode, c, r))
                    print(f"RESULT serve_load mode={mode} concurrency={c} requests={r['requests']} "
                          f"rps={r['rps']:.2f} p50_s={r['p50']:.3f} p95_s={r['p95']:.3f}", flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    print(f"\n{'mode':<14} {'conc':>4} {'req/s':>7} {'p50 s':>7} {'p95 s':>7}")
    for mode, c, r in rows:
        print(f"{mode:<14} {c:>4} {r['rps']:>7.2f} {r['p50']:>7.3f} {r['p95']:>7.3f}")


if __name__ == "__main__":
    main()
