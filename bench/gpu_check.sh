#!/usr/bin/env bash
# fxclip on one GPU, under 8 minutes: the conformance subset (float32 on the device vs a float64
# CPU reference), then `python -m bench --device cuda` on the bench models at GPU batch sizes with
# bf16 autocast rows, a bf16/float32 gradient check and CUDA memory for two models.
# Writes bench/results/<device>/ (conformance.json, <model>.json, RESULTS.md, run.log, plots).
#
#   bash bench/gpu_check.sh                       # from the repository root, on a GPU machine
#
# Every setting is an environment variable (defaults: the GPU run). The same script on the CPU,
# small, end to end:
#   DEVICE=cpu MODELS="mlp gpt" BATCH_MLP=8 BATCH_GPT=4 CONF_MODELS="mlp bilinear" CHECK_MODELS=mlp \
#     CHECK_BS_MLP=4 MEM_MODELS=mlp THREADS=2 TOTAL=3600 T_CONF=900 T_CHECK=500 T_MEM=400 \
#     bash bench/gpu_check.sh
# Then the BERT table (bench/bert_table.py: plain, fxclip, Opacus vanilla/FGC/ghost, B = 32..2048,
# T = 128, peak CUDA memory and s/step) -> $RES/bert_table.{json,png}; BERT=0 skips it. Last, the
# pretrained fine-tuning example on the device (FINETUNE=0 skips it) -> $RES/finetune_pretrained.log.
# COPY_TO=DIR copies the results folder into DIR at the end (e.g. a device runner's output folder).
# Exit status: 1 if a conformance check or a gradient check failed, 2 if nothing could run, else 0.
set -u
cd "$(dirname "$0")/.."

PY=${PYTHON:-$(command -v python || command -v python3)}
DEVICE=${DEVICE:-cuda}
MODELS=${MODELS:-"mlp gpt tied_lm hf_gpt2 cnn"}
CONFIGS=${CONFIGS:-"plain_compiled fxclip_compiled plain_compiled_bf16 fxclip_compiled_bf16 opacus_ghost"}
# one realistic GPU batch size per model (override: BATCH_<MODEL>="64 128")
BATCH_MLP=${BATCH_MLP:-512}
BATCH_GPT=${BATCH_GPT:-64}
BATCH_TIED_LM=${BATCH_TIED_LM:-64}
BATCH_HF_GPT2=${BATCH_HF_GPT2:-64}
BATCH_CNN=${BATCH_CNN:-256}
CONF_MODELS=${CONF_MODELS:-"mlp cnn tokens bilinear hf_gpt2"}
CHECK_MODELS=${CHECK_MODELS:-"gpt mlp"}       # bf16 and float32 rows vs float64 (bench --check-only)
# check batch size: the step-time one (compiled graphs come from the shared Inductor cache), but
# 16 for the MLP (its float64 per-sample reference holds B x 16.4M parameters)
CHECK_BS_MLP=${CHECK_BS_MLP:-16}
MEM_MODELS=${MEM_MODELS:-"mlp gpt"}           # torch.cuda.max_memory_allocated, one process per row
MEM_CONFIGS=${MEM_CONFIGS:-"plain_compiled fxclip_compiled"}
# the Opacus ghost-clipping post's BERT table (bench/bert_table.py) at GPU batch sizes, after the
# phases above and with its own time limit T_BERT (not part of TOTAL); BERT=0 leaves it out
BERT=${BERT:-1}
BERT_BATCH=${BERT_BATCH:-"32 512 2048"}            # the post: 32 128 512 1024 2048 (T_BERT ~900)
BERT_SEQ=${BERT_SEQ:-128}                      # the tutorial's MAX_SEQ_LENGTH
BERT_VARIANTS=${BERT_VARIANTS:-"plain_compiled fxclip_compiled opacus_ghost opacus_fgc opacus_hooks plain_eager fxclip_eager"}
BERT_INST_GB=${BERT_INST_GB:-60}               # vanilla DP-SGD's per-sample gradients up to this size
T_BERT=${T_BERT:-300}
ROUNDS=${ROUNDS:-3}
TARGET_S=${TARGET_S:-0.05}                    # timed seconds per configuration per round
THREADS=${THREADS:-8}
# wall-clock limits (seconds): TOTAL for the whole script (an install, if any, not counted);
# conformance up to T_CONF; the step-time phase gets what is left before the last T_CHECK + T_MEM +
# T_REPORT seconds, the gradient check T_CHECK and memory T_MEM
TOTAL=${TOTAL:-465}
T_CONF=${T_CONF:-170}
T_CHECK=${T_CHECK:-45}
T_MEM=${T_MEM:-35}
T_REPORT=${T_REPORT:-20}
RES=bench/results/${DEVICE%%:*}
mkdir -p "$RES"
CACHE=$(mktemp -d /tmp/fxclip-gpu-check-inductor-XXXX)  # one Inductor cache for all bench calls
trap 'rm -rf "$CACHE"' EXIT

t0=$(date +%s)
phase() { echo; echo "=== $1 ($(( $(date +%s) - t0 )) s)"; }

phase "environment"
if ! $PY -c "import torch" 2>/dev/null; then
  echo "torch missing: pip install -q torch==2.13.0 -e .[bench]"
  $PY -m pip install -q torch==2.13.0 -e ".[bench]" || { echo "install failed"; exit 2; }
  t0=$(date +%s)
elif ! $PY -c "import fxclip.passes, tqdm, dp_accounting, opacus, transformers, matplotlib" 2>/dev/null; then
  echo "fxclip or a bench dependency missing: pip install -q -e .[bench] (torch as installed)"
  $PY -m pip install -q -e ".[bench]" || $PY -m pip install -q --no-deps --no-build-isolation -e . \
    || echo "install failed: continuing with what imports"
  t0=$(date +%s)
fi
$PY - <<EOF || exit 2
import torch, fxclip
print("torch", torch.__version__, "| fxclip", fxclip.__file__)
if "$DEVICE".startswith("cuda"):
    assert torch.cuda.is_available(), "DEVICE=$DEVICE but torch.cuda.is_available() is False"
    print(torch.cuda.get_device_name(torch.device("$DEVICE")))
EOF
fail=0

phase "conformance: float32 on $DEVICE vs float64 CPU reference"
timeout "$T_CONF" $PY -W ignore -m bench.gpu_conformance --device "$DEVICE" --models $CONF_MODELS \
  --out "$RES/conformance.json" 2>"$RES/conformance.stderr"
rc=$?
[ $rc -eq 124 ] && echo "FAIL conformance: timed out after $T_CONF s (see $RES/conformance.stderr)"
[ $rc -ne 0 ] && fail=1

# the working tree as it is (the GPU machine's copy may have no .git for bench's git snapshot)
BENCH="$PY -m bench --device $DEVICE --threads $THREADS --fxclip-rev worktree --out $RES --cache-dir $CACHE"
bs_of() { local v="BATCH_$(echo "$1" | tr a-z A-Z)"; echo "${!v:-16}"; }
check_bs_of() { local v="CHECK_BS_$(echo "$1" | tr a-z A-Z)"; echo "${!v:-$(bs_of "$1")}"; }

phase "step time: $MODELS x $CONFIGS"
time_end=$(( t0 + TOTAL - T_CHECK - T_MEM - T_REPORT ))
for m in $MODELS; do  # one bench call per model: each at its own batch size
  left=$(( time_end - $(date +%s) ))
  if [ $left -le 10 ]; then echo "SKIP $m step time: time limit reached (TOTAL=$TOTAL s)"; continue; fi
  timeout "$left" $BENCH --models "$m" --batch-sizes $(bs_of "$m") --configs $CONFIGS --no-mem \
    --rounds "$ROUNDS" --warmup 2 --target-s "$TARGET_S" --timeout $(( left - 5 )) 2>&1 | tail -n 2
done

phase "gradient check: $CHECK_MODELS vs float64 (float32 tol 1e-3, bf16 5e-2)"
check_end=$(( $(date +%s) + T_CHECK ))
[ $check_end -gt $(( t0 + TOTAL - T_MEM - T_REPORT )) ] && check_end=$(( t0 + TOTAL - T_MEM - T_REPORT ))
for m in $CHECK_MODELS; do
  left=$(( check_end - $(date +%s) ))
  if [ $left -le 10 ]; then echo "SKIP $m gradient check: phase limit of $T_CHECK s reached"; continue; fi
  timeout "$left" $BENCH --models "$m" --batch-sizes $(check_bs_of "$m") --check-only \
    --configs plain_compiled fxclip_compiled plain_compiled_bf16 fxclip_compiled_bf16 \
    --timeout $(( left - 5 )) 2>&1 | tail -n 1
done
$PY - "$RES" $CHECK_MODELS <<'EOF' || fail=1
import json, sys
from pathlib import Path
out, bad = Path(sys.argv[1]), 0
for m in sys.argv[2:]:
    p = out / f"{m}.json"
    ch = json.loads(p.read_text()).get("check", {}) if p.exists() else {}
    if "configs" not in ch:
        print(f"FAIL gradient check {m}: {ch.get('error', 'no result')[:300]}")
        bad += 1
        continue
    for c, d in ch["configs"].items():
        ok = d.get("ok", False)
        bad += not ok
        extra = (f", unclipped would be {d['rel_err_vs_clipped']:.1e} from the clipped sum"
                 if "rel_err_vs_clipped" in d else "")
        print(f"{'PASS' if ok else 'FAIL'} gradient check {m}/{c}: "
              + (f"rel. error {d['rel_err']:.1e} (tol {d['tol']:g}) vs {d['against']}{extra}"
                 if "rel_err" in d else d.get("error", "?")[:300]))
sys.exit(1 if bad else 0)
EOF

phase "memory: $MEM_MODELS x $MEM_CONFIGS"
mem_end=$(( $(date +%s) + T_MEM ))
[ $mem_end -gt $(( t0 + TOTAL - T_REPORT )) ] && mem_end=$(( t0 + TOTAL - T_REPORT ))
for m in $MEM_MODELS; do
  left=$(( mem_end - $(date +%s) ))
  if [ $left -le 10 ]; then echo "SKIP $m memory: phase limit of $T_MEM s reached"; continue; fi
  timeout "$left" $BENCH --models "$m" --batch-sizes $(bs_of "$m") --configs $MEM_CONFIGS --no-time \
    --timeout $(( left - 5 )) 2>&1 | tail -n 1
done

phase "report"
timeout "$T_REPORT" $BENCH --report-only
$PY - "$RES" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for p in sorted(out.glob("*.json")):
    if p.name == "conformance.json":
        continue
    r = json.loads(p.read_text())
    for bs, row in r.get("time", {}).items():
        cells = [f"{c} {d['median_ms']:.2f} ms" if "median_ms" in d else f"{c} error"
                 for c, d in row.items() if isinstance(d, dict)]
        print(f"{r['model']} B={bs}: " + "; ".join(cells))
EOF
if [ "$BERT" = 1 ]; then
  phase "BERT table: B = $BERT_BATCH, T = $BERT_SEQ (limit $T_BERT s)"
  # one fresh process per (variant, B); no process starts after T_BERT - 60 s, none runs past 120 s
  timeout "$T_BERT" $PY -W ignore -m bench.bert_table --device "$DEVICE" --threads "$THREADS" \
    --batch-sizes $BERT_BATCH --seq-len "$BERT_SEQ" --variants $BERT_VARIANTS --warmup 2 --steps 5 \
    --max-inst-gb "$BERT_INST_GB" --deadline-s $(( T_BERT - 60 )) --cap-s 120 --cache-dir "$CACHE" \
    2>&1 | tail -n 20
  [ ${PIPESTATUS[0]} -eq 124 ] && echo "BERT table: stopped at $T_BERT s (results so far in $RES/bert_table.json)"
fi

if [ "${FINETUNE:-1}" = 1 ]; then
  T_FINETUNE=${T_FINETUNE:-300}
  phase "pretrained fine-tuning (examples/finetune_pretrained.py): plain, eps = 8 and 3 (limit $T_FINETUNE s)"
  # the head on the frozen encoder (the CPU default), then the top 2 encoder layers trained too
  timeout "$T_FINETUNE" $PY -W ignore examples/finetune_pretrained.py --device "$DEVICE" 2>&1 \
    | tee "$RES/finetune_pretrained.log" | tail -n 8
  timeout "$T_FINETUNE" $PY -W ignore examples/finetune_pretrained.py --device "$DEVICE" --top-layers 2 \
    --part private --epsilon 8 2>&1 | tee -a "$RES/finetune_pretrained.log" | tail -n 4
fi

[ -n "${COPY_TO:-}" ] && mkdir -p "$COPY_TO" && cp -r "$RES" "$COPY_TO/"
echo "wrote $RES/ (RESULTS.md, conformance.json)${COPY_TO:+, copied to $COPY_TO}; total $(( $(date +%s) - t0 )) s; $([ $fail -eq 0 ] && echo ALL PASSED || echo FAILURES ABOVE)"
exit $fail
