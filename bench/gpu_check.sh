#!/usr/bin/env bash
# One prepared check for a lent GPU (H200, no network), its steps in priority order: build, the full
# test suite on CUDA (pytest-xdist when present) and the selective_scan CUDA tests; the next_scale report
# (issue 2), the VAR/HMAR models (issue 3), selective_scan at the issue shapes (issue 5), a wall-vs-kernel
# time profile, M-VAR; a Triton tile-config sweep (bench/tune_triton.py) and the report's hierkern rows
# again with its choices; then the static check with this machine's triton and the other kernels'
# benchmarks (skip_causal, ssd_scan, causal_conv1d, axial, cached_attention, kv_reuse). The steps share
# one budget (GPU_CHECK_BUDGET_S, default 540 s: the device tool allows 600 s per command): each gets at
# most its cap of what is left, and a step with less than its minimum left is skipped, not started, and
# listed at the end with the GPU_CHECK_STEPS value that reruns it. Build, tests and the report take
# about 6 minutes on the H200.
#
#   bash bench/gpu_check.sh            # run from the repository root; results under $OUT (default ./out)
#
# Knobs: GPU_CHECK_STEPS=build,tests,... runs a subset (a rerun on a short device budget);
# GPU_CHECK_SKIP_STATIC=1 skips the static check (CI runs it on every commit); GPU_CHECK_REPORT_ARGS
# passes extra arguments to bench.report (e.g. "--configs VAR512 --ops fwd"); GPU_CHECK_PACK=FILE keeps a
# tarball of $OUT, refreshed after every step (the device tool returns at most 8 files);
# GPU_CHECK_NO_REPO_COPY=1 leaves bench/results/ alone (a dry run).
# A full run, as the device tool calls it:
#   D=$OUT; OUT=/tmp/gc GPU_CHECK_PACK=$D/gc.tgz bash bench/gpu_check.sh
#
# Everything goes under $OUT: gpu_check.log (timestamped), logs/<step>.log, static_gpu_check.json,
# pytest.xml, bench/*_cuda.{json,md,txt,png}. The bench results are also copied to
# bench/results/<date>_<device>/. Keeps going after a failing step; exits non-zero if any failed.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
mkdir -p "$OUT/logs" "$OUT/bench"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
: > "$LOG"
BUDGET="${GPU_CHECK_BUDGET_S:-540}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
T0=$SECONDS
FAILED=()
NO_TIME=()

ts() { date '+%Y-%m-%d %H:%M:%S'; }
say() { echo "[$(ts)] [+$((SECONDS - T0))s] $*" | tee -a "$LOG"; }

# budget_for CAP MIN: seconds for the next step: at most CAP and what is left of the budget; empty when
# less than MIN is left, and step then skips it (listed at the end for a rerun with GPU_CHECK_STEPS)
# instead of starting a run too short to finish. Steps run in priority order, so what is skipped is
# the least important.
budget_for() {
    local left=$((BUDGET - (SECONDS - T0)))
    [ "$left" -lt "$2" ] && return 0
    echo $(( left < $1 ? left : $1 ))
}

# GPU_CHECK_STEPS="build,tests,..." runs only the named steps (env always runs), so a rerun on a short
# device budget can skip what an earlier run measured.
wanted() { [ -z "${GPU_CHECK_STEPS:-}" ] || [ "$1" = env ] || [[ ",${GPU_CHECK_STEPS}," == *",$1,"* ]]; }

# step NAME TIMEOUT CMD...: run, log with timestamps, record failure, never abort the script.
step() {
    local name="$1" t="$2"; shift 2
    if ! wanted "$name"; then say "SKIP  $name (not in GPU_CHECK_STEPS)"; return 0; fi
    if [ -z "$t" ]; then
        say "SKIP  $name: $((BUDGET - (SECONDS - T0)))s of the ${BUDGET}s budget left, too little to start it"
        NO_TIME+=("$name")
        return 0
    fi
    say "START $name (timeout ${t}s): $*"
    local start=$SECONDS rc
    set +e
    timeout --kill-after=15 "$t" "$@" 2>&1 | tee "$OUT/logs/$name.log" | sed "s/^/    [$name] /" >> "$LOG"
    rc=${PIPESTATUS[0]}
    set -e
    if [ "$rc" -eq 0 ]; then
        say "PASS  $name ($((SECONDS - start))s)"
    else
        [ "$rc" -eq 124 ] && say "      $name timed out after ${t}s"
        say "FAIL  $name rc=$rc ($((SECONDS - start))s); last lines:"
        tail -n 25 "$OUT/logs/$name.log" | sed 's/^/      /' | tee -a "$LOG"
        FAILED+=("$name")
    fi
    pack
}

# The device tool brings back at most 8 files: GPU_CHECK_PACK=FILE also writes everything as one tarball,
# refreshed after every step so a run cut short still returns what it measured.
pack() { [ -z "${GPU_CHECK_PACK:-}" ] || tar czf "$GPU_CHECK_PACK" -C "$OUT" . 2>/dev/null || true; }

say "gpu_check: repo $(pwd), OUT=$OUT, budget ${BUDGET}s, python $PY"
step env 30 bash -c "nvidia-smi; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else \"\"); print(\"triton\", triton.__version__)'; command -v nvcc && nvcc --version | tail -n 2 || true"

export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# The H200 needs sm_90a only: half the nvcc work of the default "80;90a" (CI compiles both).
step build "$(budget_for 200 30)" env HIERKERN_CUDA_ARCHS="${HIERKERN_CUDA_ARCHS:-90a}" "$PY" -m pip install --no-build-isolation --no-deps -e .

# pytest-xdist (in the H200 image) spreads the Triton JIT compiles over the cores.
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "${GPU_CHECK_TEST_WORKERS:-8}")
step tests "$(budget_for 150 60)" env OMP_NUM_THREADS="${GPU_CHECK_TEST_THREADS:-2}" "$PY" -m pytest -q -p no:cacheprovider -m "not slow" \
    "${XDIST[@]}" tests --junitxml "$OUT/pytest.xml"

# The tests whose C++ op raises (TORCH_CHECK) crashed their xdist workers on the H200 (2026-11-30) while
# the same call raised cleanly in a fresh process there; run them once more in one plain process.
step cpp_errors "$(budget_for 40 20)" "$PY" -m pytest -q -p no:cacheprovider -p no:xdist -k "cpp_op_validates" \
    tests/test_errors.py tests/test_cached_attention_errors.py tests/test_skip_causal.py \
    tests/test_axial_attention_errors.py

# selective_scan's CUDA kernels vs the float64 reference, on the compiled route and (when cupy is installed
# on the device; it has no network, so it may not be) the NVRTC route; the NVRTC compile test too.
step scan_cuda_tests "$(budget_for 90 30)" "$PY" -m pytest -q -p no:cacheprovider -p no:xdist \
    tests/test_selective_scan_cuda.py tests/test_selective_scan_nvrtc.py -rs

# The report (issue 2's GPU targets) stops starting new configs 35 s before its timeout, so it always
# writes its outputs. The Triton kernels run their table configs here.
BT="$(budget_for 240 90)"
step bench "$BT" "$PY" -m bench.report --device cuda --out "$OUT/bench" --time-limit $((${BT:-0} - 35)) \
    ${GPU_CHECK_REPORT_ARGS:-}

# VAR / HMAR training step and generation, kernels vs the eager baseline (issue 3's GPU targets).
step bench_models "$(budget_for 90 60)" "$PY" -m bench.bench_models --device cuda --quick \
    --out "$OUT/bench/models_cuda.json"
[ -f "$OUT/logs/bench_models.log" ] && cp "$OUT/logs/bench_models.log" "$OUT/bench/models_cuda.md"

# selective_scan CUDA forward at the issue shapes (b=8, d=2048, n=16, l=680 / 2240): vs the eager reference
# and the mamba-style chunked scan, with achieved HBM bandwidth as a fraction of the H200's 4.8 TB/s.
step bench_scan "$(budget_for 60 30)" "$PY" -m bench.bench_selective_scan --device cuda --issue-shapes --dtype bf16 \
    --ops fwd fwd+bwd --reps 10 --peer-reps 1 --out "$OUT/bench/selective_scan_cuda.json"
[ -f "$OUT/logs/bench_scan.log" ] && cp "$OUT/logs/bench_scan.log" "$OUT/bench/selective_scan_cuda.txt"

# Wall time vs kernel time per call: how much of each op's time is host overhead.
step profile "$(budget_for 90 20)" "$PY" -m bench.profile_cuda --out "$OUT/bench/profile_cuda.md"

# M-VAR (d16, bf16): generation with the Mamba state carried across scales vs prefix recompute, and the
# training step, kernels vs the eager baseline (issue 5).
step bench_mvar "$(budget_for 90 45)" "$PY" -m bench.bench_mvar --device cuda --quick \
    --out "$OUT/bench/mvar_cuda.json"
[ -f "$OUT/logs/bench_mvar.log" ] && cp "$OUT/logs/bench_mvar.log" "$OUT/bench/mvar_cuda.md"

# Triton tile configs: each attention kernel's table entry against its TUNE_CANDIDATES (all compiled
# spill-free for sm_90 by the static check) at the benchmark shapes, device time of CUDA-graph replays
# (bench/tune_triton.py). The chosen configs go to $OUT/bench/triton_configs_cuda.json (rewritten after
# every kernel, so a cut-short run keeps what it measured); then the report's hierkern rows run again
# with them (HIERKERN_TRITON_CONFIGS; next_scale_tuned/, whose header lists the configs), next to the
# table configs' rows above. Fold a measured win into the tables of hierkern/ops/attention/triton.py.
TT="$(budget_for 120 50)"
step tune "$TT" "$PY" -m bench.tune_triton --out "$OUT/bench/triton_tune_cuda.json" \
    --configs-out "$OUT/bench/triton_configs_cuda.json" --time-limit $((${TT:-0} > 50 ? ${TT:-0} - 30 : 20))
if grep -q '"kernel"' "$OUT/bench/triton_configs_cuda.json" 2>/dev/null; then
    TB="$(budget_for 90 40)"
    step bench_tuned "$TB" env HIERKERN_TRITON_CONFIGS="$OUT/bench/triton_configs_cuda.json" "$PY" -m bench.report \
        --device cuda --peers hierkern --no-memory --out "$OUT/bench/next_scale_tuned" --time-limit $((${TB:-0} - 30))
elif [[ " ${NO_TIME[*]} " == *" tune "* ]]; then
    NO_TIME+=(bench_tuned)  # it needs the tune step's file: rerun both
elif wanted tune; then
    say "SKIP  bench_tuned: the tune step chose no config (see logs/tune.log)"
fi

# The rest: the static check on this machine's triton (CI runs it with its own), and the other
# kernels' benchmarks.
if [ -n "${GPU_CHECK_SKIP_STATIC:-}" ]; then
    say "SKIP  static_gpu_check: GPU_CHECK_SKIP_STATIC is set (CI runs it on every commit)"
else
    step static_gpu_check "$(budget_for 90 40)" "$PY" tests/static_gpu_check.py --json "$OUT/static_gpu_check.json"
fi

# Skip-causal (block-diffusion) attention at BD3 and SDAR shapes vs SDPA dense mask and compiled flex.
step bench_skip "$(budget_for 100 40)" "$PY" -m bench.bench_skip_causal --device cuda \
    --peers hierkern,sdpa_dense,flex --out "$OUT/bench/skip_causal_cuda.json"

# ssd_scan (Triton, chunked SSD on tensor cores) vs the eager chunked and sequential references at the
# issue's M-VAR shapes (b=8, h=32, p=64, n=64; l=680 and 2240), TFLOP/s of the Triton forward.
step bench_ssd "$(budget_for 60 30)" "$PY" -m bench.bench_ssd_scan --device cuda --dtype bf16 --b 8 --h 32 \
    --l 680 2240 --seq-max-l 680 --reps 20 --peer-reps 3 --out "$OUT/bench/ssd_scan_cuda.json"
[ -f "$OUT/logs/bench_ssd.log" ] && cp "$OUT/logs/bench_ssd.log" "$OUT/bench/ssd_scan_cuda.txt"

# causal_conv1d (Triton) vs F.conv1d with padding at Mamba-2-ish shapes.
step bench_conv "$(budget_for 40 15)" "$PY" -m bench.bench_causal_conv1d --device cuda \
    --out "$OUT/bench/causal_conv1d_cuda.json"
[ -f "$OUT/logs/bench_conv.log" ] && cp "$OUT/logs/bench_conv.log" "$OUT/bench/causal_conv1d_cuda.txt"

# Axial attention (Triton): column / row attention vs permute + SDPA, AxialTransformer sampling cached vs naive.
step bench_axial "$(budget_for 30 20)" "$PY" -m bench.bench_axial --device cuda --reps 10 \
    --out "$OUT/bench/axial_cuda.json"
[ -f "$OUT/logs/bench_axial.log" ] && cp "$OUT/logs/bench_axial.log" "$OUT/bench/axial_cuda.txt"

step bench_cached "$(budget_for 40 15)" "$PY" -m bench.bench_cached_attention --device cuda --dtype bf16
[ -f "$OUT/logs/bench_cached.log" ] && cp "$OUT/logs/bench_cached.log" "$OUT/bench/cached_attention_cuda.txt"

# Approximate KV reuse: refresh_select + scatter_kv + subset_attention vs the PyTorch composition, and
# MaskedDiffusionLM generation per cache strategy (--quick: gen_length 64).
step bench_kv_reuse "$(budget_for 60 30)" "$PY" -m bench.bench_kv_reuse --device cuda --quick \
    --out "$OUT/bench/kv_reuse_cuda.json"
[ -f "$OUT/logs/bench_kv_reuse.log" ] && cp "$OUT/logs/bench_kv_reuse.log" "$OUT/bench/kv_reuse_cuda.txt"

DEV="$("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "nogpu")' 2>/dev/null || echo unknown)"
SLUG="$(echo "$DEV" | tr '[:upper:]' '[:lower:]' | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')"
DEST="bench/results/$(date +%F)_${SLUG}"
if [ -n "${GPU_CHECK_NO_REPO_COPY:-}" ]; then
    say "results left under $OUT only (GPU_CHECK_NO_REPO_COPY is set)"
elif compgen -G "$OUT/bench/*" > /dev/null; then
    mkdir -p "$DEST"
    cp -r "$OUT"/bench/* "$DEST"/
    say "copied $(ls "$OUT/bench" | tr '\n' ' ')to $DEST/"
    mkdir -p "$OUT/results/$(basename "$DEST")"
    cp -r "$OUT"/bench/* "$OUT/results/$(basename "$DEST")"/
fi

pack

# a short summary on the console (the full logs are under $OUT/logs)
[ -f "$OUT/logs/tests.log" ] && { echo "--- tests (tail)"; tail -n 5 "$OUT/logs/tests.log"; }
[ -f "$OUT/bench/next_scale_cuda.md" ] && { echo "--- bench"; cat "$OUT/bench/next_scale_cuda.md"; }

# A rerun on a fresh device machine needs the build first.
[ ${#NO_TIME[@]} -gt 0 ] && say "not run for lack of budget: ${NO_TIME[*]} (rerun: GPU_CHECK_STEPS=build,$(IFS=,; echo "${NO_TIME[*]}"))"
if [ ${#FAILED[@]} -gt 0 ]; then
    say "gpu_check FAILED steps: ${FAILED[*]} (total $((SECONDS - T0))s)"
    [ -d "$DEST" ] && cp "$LOG" "$DEST/gpu_check.log"
    exit 1
fi
say "gpu_check: all steps passed (total $((SECONDS - T0))s)"
[ -d "$DEST" ] && cp "$LOG" "$DEST/gpu_check.log"
exit 0
