#!/usr/bin/env bash
# The study's GPU measurements, run on a GPU machine from the repository root:
#   bash benchmarks/gpu_study.sh PART...   with PART = core | study | fast | fast-probes | lab |
#                               warmup | profile | energy | scaling | scaling-events | scaling-fast
# Each part writes its printed tables under $OUT (default ./gpu-out) and leaves mlflow.db
# in the working directory (copied to $OUT after each step), so parts share one store.
set -uo pipefail
OUT=${OUT:-./gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then  # a GPU machine with torch but not mlflow/torchinfo: wheels brought in ./.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
FULL=(--dataset synthetic --train-size 50000 --quiet)
LOADER=(--workers "${WORKERS:-8}" --persistent-workers --pin-memory)  # scaling: no per-epoch start-up
run() {  # a step's output into $OUT/NAME.txt, and the store so far beside it
  local name=$1; shift; echo "== $*"; "$@" 2>&1 | tee "$OUT/$name.txt"
  cp mlflow.db "$OUT/" 2>/dev/null || true
}
nvidia-smi -L
for part in "${@:-core}"; do case "$part" in
  core)  # C2, the harness's overhead, C3/C4, the fast path
    run c2_time python3 -m cifarexp time "${FULL[@]}" --epochs 5 --workers 8
    run overhead python3 benchmarks/overhead.py --train-size 50000 --workers 8 --rounds 3
    run c3_sweep python3 -m cifarexp sweep-workers "${FULL[@]}"
    run epoch_time python3 benchmarks/epoch_time.py --workers 16
    run gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_fast_path.py -m gpu
    ;;
  study)  # C5-C7 with the best count of the sweep above, C2 again, the report
    run c5_device python3 -m cifarexp compare-device "${FULL[@]}" --workers best --cpu-batches 10
    run c6_optim python3 -m cifarexp compare-optim "${FULL[@]}" --workers best
    run c7_no_bn python3 -m cifarexp no-bn "${FULL[@]}" --workers best
    run c2_time python3 -m cifarexp time "${FULL[@]}" --epochs 5 --workers 8
    run fast_time python3 -m cifarexp time "${FULL[@]}" --epochs 5 --loader gpu \
      --precision bf16 --channels-last --compile reduce-overhead --timing events
    python3 -m cifarexp inspect --quiet
    python3 -m cifarexp report --out report > "$OUT/report.txt" 2>&1
    tar czf "$OUT/report.tgz" report
    ;;
  fast)  # the GPU tests; paths a-d, f, g alternated in rounds; a 5-epoch run of the standard
    # path, of --fast (the compiled step) with an empty compile cache (cold), then warm, and
    # of --fast with the eager step (~7 minutes on an H200)
    run gpu_tests timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_fast_path.py -m gpu
    run epoch_time timeout 300 python3 benchmarks/epoch_time.py --workers 8 --paths abcdfg \
      --rounds 5 --epochs 1
    run standard5 python3 -m cifarexp time "${FULL[@]}" --epochs 5 --workers 8
    run eager5 python3 -m cifarexp time "${FULL[@]}" --epochs 5 --fast --compile none
    export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cold
    run fast5_cold python3 -m cifarexp time "${FULL[@]}" --epochs 5 --fast
    run fast1_warm python3 -m cifarexp time "${FULL[@]}" --epochs 1 --fast
    unset TORCHINDUCTOR_CACHE_DIR
    ;;
  fast-probes)  # the step's candidate variants, each in its own process; the parts of a
    # --fast epoch over its floor; the harness's overhead against a bare loop
    run step_probe timeout 500 python3 benchmarks/step_probe.py --timeout 240
    run epoch_parts timeout 200 python3 benchmarks/epoch_parts.py --rounds 5 --profile
    run overhead timeout 120 python3 benchmarks/overhead.py --train-size 50000 --workers 8 --rounds 5
    ;;
  lab)  # the full lab into its own store, its report (with the reference column), and the
    # counter's joules against MLflow's sampled power over the lab's newest runs
    run lab timeout 420 python3 -m cifarexp lab --preset full --dataset synthetic \
      --tracking-uri sqlite:///h200.db
    cp h200.db "$OUT/"
    python3 -m cifarexp report --tracking-uri sqlite:///h200.db --out report > "$OUT/report.txt" 2>&1
    tar czf "$OUT/report.tgz" report
    run energy_check_lab python3 benchmarks/energy_check.py --tracking-uri sqlite:///h200.db
    ;;
  warmup)  # C2 with and without the warm-up, on the GPU and on the CPU
    run c2_warm python3 -m cifarexp time "${FULL[@]}" --epochs 3 --workers 8
    run c2_cold python3 -m cifarexp time "${FULL[@]}" --epochs 3 --workers 8 --no-warmup
    run c2_cpu python3 -m cifarexp time --dataset synthetic --train-size 2048 --quiet \
      --device cpu --epochs 3 --workers 0
    ;;
  profile)  # C3 (one epoch a count), then a profile of the study path at 0 workers, at the
    # best count and of the fast path; the report's Profiles section
    run c3_sweep python3 -m cifarexp sweep-workers "${FULL[@]}" --epochs 1 --workers 0,1,2,4,8,16
    for w in 0 best; do
      run "profile_$w" python3 -m cifarexp time "${FULL[@]}" --epochs 1 --workers "$w" --profile
    done
    run profile_fast python3 -m cifarexp time "${FULL[@]}" --epochs 1 --loader gpu \
      --precision bf16 --channels-last --cuda-graph --timing events --profile
    python3 -m cifarexp report --out report > "$OUT/report.txt" 2>&1
    ls -la mlartifacts/*/*/artifacts/profile_trace.json.gz > "$OUT/traces.txt" 2>&1
    tar czf "$OUT/report.tgz" report
    ;;
  energy)  # the verdict on the study's path (2 workers) and on the fast path, each with its
    # epochs' data share and J/epoch; NVML's joules against MLflow's sampled power
    # integrated over the same epochs (docs/energy.md); each optimizer's J/epoch: part lab
    run verdict_study python3 -m cifarexp time "${FULL[@]}" --epochs 3 --workers 2 --profile
    run verdict_fast python3 -m cifarexp time "${FULL[@]}" --epochs 5 --fast --profile
    run energy_check python3 benchmarks/energy_check.py
    grep -l "clears events" "$OUT"/verdict_*.txt > "$OUT/kineto_lines.txt" 2>&1
    ;;
  scaling)  # on a 4-GPU machine: what DDP adds to a step, then C5 over 1, 2, 4 GPUs
    { nvidia-smi topo -m; lscpu | grep -E '^(CPU\(s\)|Thread|Core|Socket|Model name|NUMA)'; } \
      > "$OUT/machine.txt" 2>&1
    for n in ${PROBE:-2 4}; do
      run "steps_$n" python3 -m torch.distributed.run --standalone --nproc-per-node "$n" \
        benchmarks/ddp_steps.py --rounds 6
      run "probe_$n" python3 -m torch.distributed.run --standalone --nproc-per-node "$n" \
        benchmarks/ddp_probe.py --workers "${WORKERS:-8}"
    done
    run c5_gpus python3 -m cifarexp compare-device "${FULL[@]}" --gpus 1,2,4 --epochs 3 \
      "${LOADER[@]}"
    ;;
  scaling-events)  # the same, the standard loader timed with CUDA events (no per-step wait)
    run c5_gpus_events python3 -m cifarexp compare-device "${FULL[@]}" --gpus 1,2,4 \
      --epochs 3 "${LOADER[@]}" --timing events
    ;;
  scaling-fast)  # the same on the fast path
    run c5_gpus_fast timeout "${FAST_LIMIT:-600}" python3 -m cifarexp compare-device \
      "${FULL[@]}" --gpus 1,2,4 --epochs 3 --loader gpu --precision bf16 --channels-last \
      --compile reduce-overhead --timing events
    ;;
esac; done
tar czf "$OUT/mlartifacts.tgz" mlartifacts 2>/dev/null || true
