#!/usr/bin/env bash
# Every GPU check of a session in one run on a lent GPU machine (python3 there has torch 2.11 and an older
# transformers; the pinned transformers and peft travel as wheels in .whl/, with bitsandbytes for QLoRA and
# liger-kernel for Liger: `pip download liger-kernel==0.8.5 --no-deps -d .whl`). Each check has its own time
# limit and log in $OUT; the summary is the RESULT lines. The default set (issue 16) fits in about 8 minutes
# on an H100/H200 (limits: 30 s setup + 75 + 90 + 180 + 120 s); name checks to run others:
#   run: bash benchmarks/gpu_session.sh                       (with .whl carried)
#        CHECKS="infer demo scaling qlora" bash benchmarks/gpu_session.sh    (last session's checks)
# flash-attn is too big to carry (and the machine has no network): `mixtoken_flash` and the packing check's
# flash_attention_2 case report "not installed"; torch's own varlen flash kernel (PACKED_VARLEN) runs instead.
# flash kernels take fp16 / bf16 only, so fp32 packed == unpacked is shown by the SDPA paths.
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
CHECKS=${CHECKS:-"packing liger throughput memory"}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
python3 -c "import importlib.util as u; print('installed:', {m: u.find_spec(m) is not None for m in ('liger_kernel', 'bitsandbytes', 'flash_attn', 'triton')})"
check() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  case " $CHECKS " in *" $name "*) ;; *) return 0 ;; esac
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s"
  grep -E "^RESULT|Error|error:" "$OUT/$name.log" | tail -24
}
# issue 16: packed == unpacked on every attention path (fp32 and bf16; PACKED_VARLEN and flash-attention in bf16)
check packing 75 python3 benchmarks/packing_gpu_check.py
# issue 16: Liger on vs off (loss within 1e-4 in fp32, padded and packed), then `mixtune train` with use_liger_kernel
check liger 90 python3 benchmarks/liger_gpu_check.py
# issue 16: Qwen2-VL-2B sizes, tokens/s, MFU and peak memory per setting (the best MFU goes in the note)
check throughput 180 python3 benchmarks/gpu_throughput.py --size 2b --steps 6 --warmup 2 \
  --settings padded,mixtoken_mask,mixtoken_packed,mixtoken_varlen,mixtoken_flash,padded+liger,mixtoken_mask+liger,mixtoken_varlen+liger
# issue 16: full SFT vs LoRA vs QLoRA peak memory at batch 4 (2B sizes)
check memory 120 python3 benchmarks/memory.py --size 2b --batch_size 4 --steps 2
# earlier sessions' checks (by name in CHECKS)
check infer 100 python3 benchmarks/infer_gpu_check.py
check demo 120 python3 -m mixtune demo --output_dir /tmp/demo --num_train_epochs 2 --bf16 true --dataloader_num_workers 2
case " $CHECKS " in *" demo "*)
python3 - <<'PY' 2>/dev/null | sed 's/^/RESULT demo /'
import json; r = json.load(open("/tmp/demo/demo_report.json"))
print({k: r[k] for k in r if k not in ("examples",) and not isinstance(r[k], (list, dict))})
PY
;; esac
check scaling 180 python3 benchmarks/scaling_gpu_check.py --layers 4
check qlora 120 python3 benchmarks/qlora_gpu_check.py  # needs the bitsandbytes wheel in .whl too
