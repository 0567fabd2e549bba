#!/usr/bin/env bash
# The whole GPU check of issue 17, in ONE call of the device tool on a lent H100/H200 (about 8 minutes):
#
#   1. here (network, the project's venv):  bash bench/gpu_prepare.sh      -> .gpu_carry/ (~50 MiB)
#   2. device tool:  run(command="bash bench/gpu_session.sh", carry=[".gpu_carry"], timeout_s=590)
#
# The device machine has no network and starts bare. Its python3 (/opt/torch/.venv: Python 3.12, torch,
# lightning 2.6.6, transformers, pyarrow, tensorboard, matplotlib, ...) runs everything; what it lacks
# travels in .gpu_carry/wheels and is installed into /tmp/site (no index, no dependencies resolved).
# The demo shards and the v1 fixtures travel in .gpu_carry too. Each step has its own time limit so
# that one stuck step cannot eat the others; every figure lands in $OUT (at most 8 files come back):
#   gpu_tier.log            pytest -m gpu (FP16/BF16 steps, overflow skip, FP16 gate, check-fp16, ZeRO-2, fp16 inference)
#   gpu_figures.json        the FP16-vs-FP32 figures on CUDA (callback + check-fp16) for recalibrating tolerances
#   train_throughput.txt    FP32/FP16/BF16 per stage (small v1 llm/flow) + the official-size v2 LLM with MFU
#   inference.txt           RTF and peak memory per stage, FP16/BF16 vs FP32
#   speed.txt               bench/attention.py (SDPA), bench/vs_upstream.py (torch.compile, SDPA),
#                           bench/batched_features.py on CUDA: the item-5 candidates measured on the GPU
#   env.txt                 nvidia-smi, versions, the time each step took
#   demo_*                  ONLY=demo (opt-in, its own call): the default recipe at GPU step counts (step 5)
# SMOKE=1 runs the same steps with tiny sizes (what a CPU check of this script does:
#   SMOKE=1 PY=python OUT=/tmp/gpu-out COSYTRAIN_GPU_TIER_ON_CPU=1 bash bench/gpu_session.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
PY=${PY:-python3}
CARRY=.gpu_carry
SMOKE=${SMOKE:-0}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
START=$(date +%s)
stamp() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/env.txt"; }

# ---------------------------------------------------------------- environment
{
    nvidia-smi 2>&1 | head -15
    $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none',
'bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported())"
} >> "$OUT/env.txt" 2>&1
if [ -d "$CARRY/wheels" ] && [ -z "${NO_WHEELS:-}" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$CARRY"/wheels/*.whl >> "$OUT/env.txt" 2>&1 || stamp "wheel install FAILED (see above)"
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
[ -d "$CARRY/reference" ] && export COSYTRAIN_REFERENCE="$PWD/$CARRY/reference"
export COSYTRAIN_HOME=/tmp/cosytrain-home COSYTRAIN_GPU_FIGURES="$OUT/figures"
$PY -c "import deepspeed, jsonargparse, lightning; print('deepspeed', deepspeed.__version__, 'jsonargparse',
jsonargparse.__version__, 'lightning', lightning.__version__)" >> "$OUT/env.txt" 2>&1
DATA_LIST=/tmp/demo/data.list
if [ -d "$CARRY/demo" ]; then
    mkdir -p /tmp/demo
    while read -r shard; do echo "$PWD/$CARRY/demo/$shard"; done < "$CARRY/demo/shards.txt" > "$DATA_LIST"
else
    DATA_LIST=""
fi
DATA_ARG=${DATA_LIST:+--data_list $DATA_LIST}
stamp "environment ready"

if [ "$SMOKE" = 1 ]; then
    STEPS=1; WARM=1; FRAMES_OFFICIAL=600; TOKENS=20; REPEATS=1; ATT_LENS=50; VS="--steps 1 --warmup 1 --batch 2"
    TIER_T=900; SMALL_T=900; OFFICIAL_T=900; INFER_T=600; ATT_T=600; VS_T=900; COMPILE_T=60; FEAT_T=300
    V2_LLM=conf/model/llm_v2_tiny.yaml; QWEN=conf/model/qwen2_tiny  # the official size is too slow for a CPU smoke
else  # the most each step may take: 545 s together, inside the tool's 600 s per command (timeout_s=590)
    STEPS=10; WARM=3; FRAMES_OFFICIAL=12000; TOKENS=200; REPEATS=3; ATT_LENS=300,1000; VS="--steps 8 --warmup 3 --batch 16"
    TIER_T=140; SMALL_T=90; OFFICIAL_T=100; INFER_T=50; ATT_T=25; VS_T=35; COMPILE_T=90; FEAT_T=15
    V2_LLM=conf/model/llm_v2.yaml; QWEN=bench/qwen2_0.5b  # CosyVoice2-0.5B's LLM, random init
fi

want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }  # ONLY="tier train infer speed": a subset
asked() { [[ " ${ONLY:-} " == *" $1 "* ]]; }  # opt-in steps, not in the default session

# ---------------------------------------------------------------- 1. the gpu test tier
if want tier; then
    timeout "$TIER_T" $PY -m pytest tests/gpu -m gpu -q -p no:cacheprovider -rA --durations=12 > "$OUT/gpu_tier.log" 2>&1
    rc=$?; stamp "pytest -m gpu: exit $rc ($(tail -1 "$OUT/gpu_tier.log"))"
fi

# ---------------------------------------------------------------- 2. training throughput
want train && {
    timeout "$SMALL_T" $PY bench/train_throughput.py --stages llm,flow --steps "$STEPS" --warmup "$WARM" $DATA_ARG
    echo
    timeout "$OFFICIAL_T" $PY bench/train_throughput.py --stages llm --configs "llm=$V2_LLM" --qwen_path "$QWEN" \
        --steps "$STEPS" --warmup "$WARM" --max_frames "$FRAMES_OFFICIAL" $DATA_ARG
} > "$OUT/train_throughput.txt" 2>&1
want train && stamp "train_throughput: done"

# ---------------------------------------------------------------- 3. inference RTF and memory
if want infer; then
    timeout "$INFER_T" $PY bench/inference.py --tokens "$TOKENS" --repeats "$REPEATS" > "$OUT/inference.txt" 2>&1
    rc=$?; stamp "inference: exit $rc"
fi

# ---------------------------------------------------------------- 4. speed candidates on the GPU (item 5)
want speed && {
    timeout "$ATT_T" $PY bench/attention.py --precision bf16-mixed --speech_lens "$ATT_LENS" --repeats "$REPEATS"
    echo
    timeout "$VS_T" $PY bench/vs_upstream.py --python current --variants cosytrain,sdpa --device auto $VS
    echo
    # torch.compile pays its compilation first: its own run and limit, the LLM only
    timeout "$COMPILE_T" $PY bench/vs_upstream.py --python current --stages llm --variants cosytrain,compile \
        --device auto $VS
    echo
    timeout "$FEAT_T" $PY bench/batched_features.py --device "$($PY -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')"
} > "$OUT/speed.txt" 2>&1
want speed && stamp "speed candidates: done"

# ---------------------------------------------------------------- 5. the demo recipe at GPU step counts (opt-in)
# Issue 15: on 2 CPU cores the default recipe's flow stays ~3x the vocoder floor (bench/README.md, "Where the
# flow's MCD goes"); does it approach the floor with GPU-sized compute? ONLY=demo runs recipes/sft.yaml alone
# for DEMO_MIN minutes of training (max_time; the corpus is built there with the carried espeakng-loader),
# validating and synthesising every DEMO_VAL steps. Back: demo_reports.md (each validation's report, in step
# order), demo_scalars.json (every synth/* and val/* scalar by step), demo_fit.log (the end of the log).
# resemblyzer is not carried, so SIM is absent there (the callback warns and goes on).
if asked demo; then
    DEMO_MIN=${DEMO_MIN:-7}; DEMO_VAL=${DEMO_VAL:-2000}
    [ "$SMOKE" = 1 ] && { DEMO_MIN=1; DEMO_VAL=50; }
    rm -rf /tmp/demo_scale
    timeout $((DEMO_MIN * 60 + 240)) $PY -m cosytrain fit --config recipes/sft.yaml --trainer.max_steps 1000000 \
        --trainer.max_time "00:00:$(printf %02d "$DEMO_MIN"):00" --trainer.val_check_interval "$DEMO_VAL" \
        --trainer.default_root_dir /tmp/demo_scale > /tmp/demo_fit.log 2>&1
    rc=$?; tail -c 20000 /tmp/demo_fit.log | tr '\r' '\n' | tail -n 60 > "$OUT/demo_fit.log"
    for r in /tmp/demo_scale/synthesis/step_*/report.md; do [ -f "$r" ] && { cat "$r"; echo; }; done > "$OUT/demo_reports.md"
    $PY bench/tb_scalars.py /tmp/demo_scale --prefix synth/,val/ > "$OUT/demo_scalars.json" 2>> "$OUT/env.txt"
    stamp "demo recipe: exit $rc, $(grep -c '^# Synthesis at step' "$OUT/demo_reports.md") validations"
fi

# ---------------------------------------------------------------- collect the figures
$PY - "$OUT" <<'EOF' >> "$OUT/env.txt" 2>&1
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
figures = {p.stem: json.loads(p.read_text()) for p in sorted((out / "figures").glob("*.json"))}
(out / "gpu_figures.json").write_text(json.dumps(figures, indent=1, default=str))
print("figures:", sorted(figures))
EOF
rm -rf "$OUT/figures"
stamp "session done"
