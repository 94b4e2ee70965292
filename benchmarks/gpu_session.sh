#!/usr/bin/env bash
# Every GPU check of a session in one run on a lent GPU machine (python3 there has torch 2.11 and an older
# transformers; the pinned transformers and peft travel as wheels in .whl/). Each check has its own time
# limit and log in $OUT; the summary is the RESULT lines.
#   run: bash benchmarks/gpu_session.sh   (with .whl carried)
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
check() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s"
  grep -E "^RESULT|Error|error:" "$OUT/$name.log" | tail -12
}
check infer 100 python3 benchmarks/infer_gpu_check.py
check demo 120 python3 -m mixtune demo --output_dir /tmp/demo --num_train_epochs 2 --bf16 true --dataloader_num_workers 2
python3 - <<'PY' 2>/dev/null | sed 's/^/RESULT demo /'
import json; r = json.load(open("/tmp/demo/demo_report.json"))
print({k: r[k] for k in r if k not in ("examples",) and not isinstance(r[k], (list, dict))})
PY
check scaling 180 python3 benchmarks/scaling_gpu_check.py --layers 4
check qlora 120 python3 benchmarks/qlora_gpu_check.py  # needs the bitsandbytes wheel in .whl too
