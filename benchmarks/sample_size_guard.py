"""Peak memory of reading a data file that holds one huge record, before and after the max_sample_bytes guard,
and the speed of the streamed JSON list reader against json.loads of the whole file.

    python benchmarks/sample_size_guard.py [--before /path/to/old/src] [--mb 200]

Each measurement runs in a fresh process (peak RSS from getrusage). `--before` points at another checkout's
src/ (e.g. /work/main/src) to measure the old reader on the same files. Prints `RESULT ...` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")

CHILD = r"""
import resource, sys, time
from mixtune.data.badsamples import BadSamples
from mixtune.data.dataset import DatasetEntry, read_entry
path, name = sys.argv[1], sys.argv[2]
start = time.perf_counter()
bad = BadSamples("skip")
convs = read_entry(DatasetEntry(name=name, data_files=path), bad)
took = time.perf_counter() - start
print(len(convs), len(bad.records), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, round(took, 2))
"""


def sample(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]}


def measure(src: str, path: str, name: str = "sharegpt") -> tuple[int, int, int, float]:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(src), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, path, name], env=env, capture_output=True, text=True)
    if out.returncode:
        return (-1, -1, -1, -1.0)
    kept, skipped, rss_mb, took = out.stdout.split()
    return int(kept), int(skipped), int(rss_mb), float(took)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", default=None, help="src/ folder of the code to compare with")
    parser.add_argument("--mb", type=int, default=200, help="size of the huge record in MB")
    parser.add_argument("--records", type=int, default=200_000, help="records in the speed test's JSON list")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        good = json.dumps(sample("hello"))
        huge = json.dumps(sample("x" * (args.mb * 1_000_000)))
        files = {"jsonl": os.path.join(tmp, "huge.jsonl"), "json_list": os.path.join(tmp, "huge.json")}
        with open(files["jsonl"], "w") as f:
            f.write(f"{good}\n{huge}\n{good}\n")
        with open(files["json_list"], "w") as f:
            f.write(f"[{good},\n{huge},\n{good}]\n")
        del huge
        empty = os.path.join(tmp, "empty.jsonl")
        open(empty, "w").close()
        for label, src in [("before", args.before), ("after", HERE_SRC)]:
            if src is None:
                continue
            base = measure(src, empty)[2]
            for kind, path in files.items():
                kept, skipped, rss, took = measure(src, path)
                print(f"RESULT {label} {kind} one {args.mb} MB record: peak RSS {rss} MB (interpreter + imports "
                      f"alone {base} MB), kept {kept}, skipped {skipped}, {took} s")
        speed = os.path.join(tmp, "many.json")
        with open(speed, "w") as f:
            json.dump([sample(f"question {i} " * 20) for i in range(args.records)], f)
        size = os.path.getsize(speed) / 1e6
        for label, src in [("before", args.before), ("after", HERE_SRC)]:
            if src is not None:
                kept, _, rss, took = measure(src, speed)
                print(f"RESULT {label} json_list {args.records} records ({size:.0f} MB): {took} s, peak RSS {rss} MB")


if __name__ == "__main__":
    main()
