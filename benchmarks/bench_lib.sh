# Sourced (not run) by benchmarks/gpu_bench.sh and benchmarks/gpu_qlora.sh: their settings, the model,
# one run per process (so that each peak is its own), the report. See benchmarks/gpu_bench.py for what
# is measured and how.
#
# Settings (environment):
#   PYTHON=python3          the interpreter with phi3-lora's dependencies (pip install -e '.[bench]')
#   SHAPE=phi3-mini         or tiny (tiny-deep: 32 layers): the same plumbing on the CPU (no GPU figures)
#   SEQS="2048 4096"        the short and the long sequence length ("128 256" with SHAPE=tiny*)
#   WARMUP=3 STEPS=10       untimed, then timed optimizer steps of every run
#   RESULTS=benchmarks/results   where the report's JSON goes (every run's figures are in it), and
#                           NAME.runs.jsonl (NAME: the script's), each run's figures appended as it ends, so
#                           that `gpu_bench.py report` can rebuild the report from what finished if the
#                           script itself is stopped
#   WORK=/tmp/phi3-lora-bench    the random model (model-$SHAPE, 7.6 GB for phi3-mini, reused when there;
#                           MODEL_DIR overrides) and each run's figures, log and outputs (runs/LABEL*)
#   RUN_TIMEOUT=180         seconds one run may take before it is stopped (it then counts as failed)
#   PROFILE="LABEL ..."     after each of these runs, run it once more under torch.profiler (2 warm-up and 4
#                           steps, the last 3 profiled; ~30 s each): RESULTS/profile-LABEL.txt and its
#                           .trace.json.gz; the profiled run's figures stay out of the report
# A failed run is reported with the end of its log, the others still run; the script then exits non-zero.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
SHAPE=${SHAPE:-phi3-mini}
RESULTS=${RESULTS:-benchmarks/results}
WORK=${WORK:-${TMPDIR:-/tmp}/phi3-lora-bench}
MODEL_DIR=${MODEL_DIR:-$WORK/model-$SHAPE}
WARMUP=${WARMUP:-3}
STEPS=${STEPS:-10}
RUN_TIMEOUT=${RUN_TIMEOUT:-180}
PROFILE=${PROFILE:-}
if [[ $SHAPE == tiny* ]]; then SEQS=${SEQS:-"128 256"}; else SEQS=${SEQS:-"2048 4096"}; fi
read -r SHORT LONG MORE <<< "$SEQS" || true
if [ -z "${LONG:-}" ] || [ -n "${MORE:-}" ]; then
    echo "SEQS must hold two sequence lengths, the short one first (got '$SEQS')" >&2
    exit 2
fi
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF-expandable_segments:True}  # set it empty for none
mkdir -p "$RESULTS" "$WORK/runs"
RUNS_JSONL="$RESULTS/$(basename "$0" .sh).runs.jsonl"  # emptied by make_model, when the runs begin
BENCH_START=$SECONDS
RESULT_FILES=()
FAILED=()
NO_PAGED=

# make_model [--require trl bitsandbytes]: check CUDA and the packages, build or reuse the random model.
make_model() {
    "$PYTHON" benchmarks/gpu_bench.py make-model --dir "$MODEL_DIR" --shape "$SHAPE" "$@"
    : > "$RUNS_JSONL"
}

# check_paged: bitsandbytes' paged optimizers keep large states in CUDA managed memory, which some GPU
# sandboxes refuse or stall on. One step is tried first in its own process, under a timeout; if it fails,
# every run after it replaces a paged optimizer by its unpaged twin (gpu_bench.py --no-paged), and says so.
check_paged() {
    if ! timeout -k 5 90 "$PYTHON" benchmarks/gpu_bench.py check-paged; then
        NO_PAGED=1
        echo "!!! bitsandbytes' paged optimizer failed here: runs use its unpaged twin (marked paged_replaced)"
    fi
}

# [VARIANT=NAME] bench SIDE LABEL RECIPE SEQ [KEY=VALUE ...]: one run of SIDE (ours or trl), its figures in
# $WORK/runs/LABEL.json, its output in $WORK/runs/LABEL.log; VARIANT names an extra run's overrides.
bench() {
    local side=$1 label=$2 recipe=$3 seq=$4 rc
    shift 4
    local out="$WORK/runs/$label"
    echo "=== $label: $side, seq $seq, $WARMUP+$STEPS steps${*:+, $*} [$((SECONDS - BENCH_START))s]"
    rm -f "$out.json"
    local run=(timeout -k 15 "$RUN_TIMEOUT" "$PYTHON" benchmarks/gpu_bench.py "$side" --model "$MODEL_DIR"
               --recipe "$recipe" --seq "$seq" --variant "${VARIANT:-}" ${NO_PAGED:+--no-paged})
    if "${run[@]}" --warmup "$WARMUP" --steps "$STEPS" --label "$label" --out "$out.json" --set "$@" \
            > "$out.log" 2>&1; then
        tail -n 1 "$out.log"
        RESULT_FILES+=("$out.json")
        { tr -d '\n' < "$out.json"; echo; } >> "$RUNS_JSONL"  # one line: json.dumps escapes newlines in strings
        if [[ " $PROFILE " == *" $label "* ]]; then
            echo "    $label again under the profiler: $RESULTS/profile-$label.txt"
            if ! "${run[@]}" --warmup 2 --steps 4 --label "$label-profiled" --out "$out-profiled.json" \
                    --profile "$RESULTS/profile-$label.txt" --set "$@" > "$out-profiled.log" 2>&1; then
                echo "!!! the profiled run of $label failed; the end of $out-profiled.log:"
                tail -n 5 "$out-profiled.log" | sed 's/^/    /'
            fi
        fi
    else
        rc=$?
        echo "!!! $label failed (exit $rc$([ $rc -eq 124 ] && echo ", stopped after RUN_TIMEOUT=${RUN_TIMEOUT}s")); the end of $out.log:"
        tail -n 25 "$out.log" | sed 's/^/    /'
        FAILED+=("$label")
    fi
}

# report GOALS JSON: the table and the goals of the runs that succeeded; exits non-zero if any failed.
report() {
    if [ ${#RESULT_FILES[@]} -eq 0 ]; then
        echo "no run succeeded" >&2
        exit 1
    fi
    "$PYTHON" benchmarks/gpu_bench.py report "${RESULT_FILES[@]}" --goals "$1" --json "$2"
    echo "total: $((SECONDS - BENCH_START))s"
    if [ ${#FAILED[@]} -gt 0 ]; then
        echo "failed runs: ${FAILED[*]} (see $WORK/runs/LABEL.log)" >&2
        exit 1
    fi
}
