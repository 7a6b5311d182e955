#!/usr/bin/env bash
# The GPU figures of docs/BENCHMARKS.md in one script, for a GPU machine lent for a few minutes. Every step
# has its own time limit and a failed step does not stop the others. $OUT gets two files: summary.md (each
# step's exit code, time and table) and logs.tar.gz (every log, JSON result and the quickstart's report).
#
#   bash bench/gpu_session.sh perf      # needs no demo model: gpu_check (1.1B: old path, new path, compiled
#                                       # layers; 7B), log-prob memory at a 256k vocabulary
#   bash bench/gpu_session.sh demo      # needs the demo model: the entrypoint under torchrun with ZeRO-2 and
#                                       # ZeRO-3 (bf16, NCCL), then the quickstart end to end, timed
#   DRY_RUN=1 bash bench/gpu_session.sh perf demo   # the same steps on a CPU at toy sizes (model=tiny, gloo)
#
# PYTHON (default python3) runs everything; DEEPALIGN (default "$PYTHON -m deepalign") is the entrypoint.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${OUT:-/tmp/deepalign-gpu}
PYTHON=${PYTHON:-python3}
DEEPALIGN=${DEEPALIGN:-"$PYTHON -m deepalign"}
DRY=${DRY_RUN:-0}
WORK=$(mktemp -d)
LOGS=$WORK/logs
mkdir -p "$OUT" "$LOGS"

step() {  # step NAME SECONDS COMMAND...: run it with a time limit, log to $LOGS/NAME.log, sum it up
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  {
    printf '\n## %s: rc=%s, %ss\n\n' "$name" "$rc" "$(($(date +%s) - start))"
    grep -E '^\|' "$LOGS/$name.log" | tail -n 14
    [ "$rc" = 0 ] || tail -n 5 "$LOGS/$name.log"
  } | tee -a "$OUT/summary.md"
  return "$rc"
}

perf() {
  local check=("$PYTHON" "$HERE/gpu_check.py") memory=("$PYTHON" "$HERE/logprob_memory.py")
  if [ "$DRY" = 1 ]; then
    check+=(--dry-run)
    memory+=(--quick)
  else
    memory+=(--device cuda --batch 8)
  fi
  step check_1b_before 150 "${check[@]}" --logprob-chunk-mib 0 --no-fused-adamw --gen-caches dynamic \
    --json "$LOGS/check_1b_before.json"
  step check_1b 200 "${check[@]}" --json "$LOGS/check_1b.json"
  step check_1b_compiled 200 "${check[@]}" --compile --gen-caches dynamic --json "$LOGS/check_1b_compiled.json"
  step check_7b 240 "${check[@]}" --preset 7b --gen-caches dynamic --json "$LOGS/check_7b.json" ||
    step check_7b_offload 300 "${check[@]}" --preset 7b --offload-optimizer --gen-caches dynamic \
      --json "$LOGS/check_7b_offload.json"
  step logprob_memory 200 "${memory[@]}"
}

demo() {
  local model=smollm2_135m_instruct bf16=true
  [ "$DRY" = 1 ] && model=tiny bf16=false
  local run=(model=$model logger=none data=chat_file data.components.chat.source=demo:probe_chats
    data.max_length=128 train.per_device_batch_size=4 train.max_steps=6 "train.bf16=$bf16" loss=constrained
    "stages=[train,attack]" eval.prompts=demo:harmful_prompts eval.limit=16 generation.max_new_tokens=32
    launcher=torchrun launcher.nproc_per_node=1 "paths.cache_dir=$WORK/cache")
  (cd "$WORK" && step torchrun_zero2 240 $DEEPALIGN "${run[@]}" train.deepspeed=zero2 hydra.run.dir=zero2)
  (cd "$WORK" && step torchrun_zero3 240 $DEEPALIGN "${run[@]}" train.deepspeed=zero3 hydra.run.dir=zero3)
  local quick=(experiment=quickstart "paths.cache_dir=$WORK/cache" hydra.run.dir=quickstart)
  [ "$DRY" = 1 ] && quick+=(model=tiny +model.arch.initializer_range=0.3 logger=none train.bf16=false
    generation.dtype=float32 quickstart.harvest_tokens=12 quickstart.harvest_eval_tokens=12
    quickstart.benign_tokens=8 quickstart.eval_limit=4 "attack.prefill.depths=[2,4]"
    "attack.prefill_own.depths=[2,4]" train.max_steps=2 quickstart.runs.ft_sft.train.max_steps=2
    quickstart.runs.ft_constrained.train.max_steps=2 quickstart.runs.shallow.attack.gcg.max_prompts=1
    quickstart.runs.shallow.attack.gcg.steps=1 quickstart.runs.shallow.attack.gcg.search_width=8
    quickstart.runs.shallow.attack.gcg.topk=8 quickstart.runs.deep.attack.gcg=null
    generation.max_new_tokens=6 utility.max_new_tokens=6 analysis.positions=5)
  (cd "$WORK" && step quickstart 420 $DEEPALIGN "${quick[@]}")
  cp "$WORK"/quickstart/report.md "$LOGS/quickstart_report.md" 2>/dev/null
  for d in zero2 zero3; do cp "$WORK/$d/metrics.json" "$LOGS/${d}_metrics.json" 2>/dev/null; done
}

: >"$OUT/summary.md"
[ $# -gt 0 ] || set -- perf
for part in "$@"; do
  case $part in
    perf | demo) "$part" ;;
    *) echo "unknown part $part (perf, demo)" >&2; exit 2 ;;
  esac
done
tar czf "$OUT/logs.tar.gz" -C "$LOGS" .
rm -rf "$WORK"
echo "summary and logs in $OUT"
