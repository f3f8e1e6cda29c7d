#!/usr/bin/env bash
# BUSI fold 0 through all three phases, plus the GPU benchmarks: the run behind the bundle READMEs' real-run numbers.
#
#   STAGES="env bench p1" bash benchmarks/busi_fold0.sh          # first half
#   STAGES="p2 p3" bash benchmarks/busi_fold0.sh                 # second half (needs p1's checkpoint)
#   TINY=1 E1=1 E2=1 E3=1 WORKERS=0 bash benchmarks/busi_fold0.sh  # CPU dry run: demo-size networks, 2 iterations
#
# Every stage runs the README's own commands (`monai.bundle run` with CLI overrides) under a wall-clock cap
# (`timeout`): a capped training stops at its last atomic checkpoint and the next stage uses its best.pt, so a run
# always finishes inside a device lease. Random initialisation throughout (no R50+ViT-B_16.npz / MedSAM file here).
# Logs, metrics, overlays and TensorBoard events go into $OUT/results.tar.gz (refreshed after every stage) and a
# summary into $OUT/summary.txt.
set -u
STAGES=${STAGES:-"env bench p1 p2 p3"}
DATA_ROOT=${DATA_ROOT:-./dataset/processed}
CKPT=${CKPT:-./checkpoints}
OUT=$(realpath -m "${OUT:-./busi_fold0_out}")
PY=${PY:-python3}
TINY=${TINY:-0}
WORKERS=${WORKERS:-8}
E1=${E1:-60}    # phase-1 epochs (published: 150)
E2=${E2:-15}    # phase-2 epochs (published: 50), SPI corrupted copies of each image per epoch
SPI=${SPI:-4}
E3=${E3:-10}    # phase-3 epochs (published: 100)
CAP_P1=${CAP_P1:-160}; CAP_P2=${CAP_P2:-100}; CAP_P3=${CAP_P3:-140}; CAP_EVAL=${CAP_EVAL:-45}; CAP_BENCH=${CAP_BENCH:-100}
WORK=$CKPT/busi_fold0_logs
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # run from the repository root

common=(--data_root "$DATA_ROOT" --ckpt_root "$CKPT" --dataset_name BUSI --fold 0
        --num_workers "$WORKERS")
bench_refiner=(--model vit_b --batch 8 --steps 20 --amp)
tiny_model_path() { [ "$TINY" = 1 ] && echo "--model_path $CKPT/models/$1.pt"; }  # the demo configs write ./models/
bench_e2e=(--image-resize torch --steps 15)
if [ "$TINY" = 1 ]; then bench_refiner=(--model tiny --batch 2 --steps 2); bench_e2e=(--tiny --steps 2); fi

configs() {  # configs BUNDLE NAME... -> "['bundles/B/configs/NAME.json',...]" (+ the demo's tiny override)
  local b=$1 files=""; shift
  for n in "$@"; do files+="'bundles/$b/configs/$n.json',"; done
  [ "$TINY" = 1 ] && files+="'ultrarefiner/demo_configs/$b.json',"
  echo "[${files%,}]"
}

pack() {  # everything small that a person reads afterwards; checkpoints stay behind
  (cd "$CKPT" && find . \( -name '*.log' -o -name '*.json' -o -name '*.csv' -o -name '*.png' -o -name 'events.*' \) \
     -size -4M -not -path '*/tensorboard/overlays/*' -print0 | tar czf "$OUT/results.tar.gz.tmp" --null -T - \
     2>/dev/null) && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
}

stage() {  # stage NAME CAP_SECONDS COMMAND...: capped, logged, timed; never stops the script
  local name=$1 cap=$2; shift 2
  local start=$SECONDS
  echo "=== $name (cap ${cap}s): $*" | tee -a "$OUT/summary.txt"
  timeout -k 10 "$cap" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
  tr '\r' '\n' < "$WORK/$name.log" | grep -aE "samples/s|images/s|speed|Complete|BEST|Error|error:|Traceback" \
    | grep -av "it/s\]\|%|" | tail -30 >> "$OUT/summary.txt"
  pack
  return $rc
}


for s in $STAGES; do case $s in
env)
  { nvidia-smi -L; $PY -c "import sys, torch, monai, ignite, segment_anything, timm, ultrarefiner
print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', 'monai', monai.__version__,
      'ignite', ignite.__version__, 'timm', timm.__version__)"; } 2>&1 | tee -a "$OUT/summary.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "environment check failed" | tee -a "$OUT/summary.txt"; exit 1; } ;;
bench)
  stage bench_refiner_cache "$CAP_BENCH" $PY benchmarks/bench_refiner_cache.py "${bench_refiner[@]}"
  stage bench_e2e "$CAP_BENCH" $PY benchmarks/bench_e2e.py "${bench_e2e[@]}" ;;
p1)
  stage p1_train "$CAP_P1" $PY -m monai.bundle run --config_file "$(configs transunet train)" --bundle_root bundles/transunet "${common[@]}" $(tiny_model_path transunet) --epochs "$E1"
  stage p1_eval "$CAP_EVAL" $PY -m monai.bundle run --config_file "$(configs transunet train evaluate)" --bundle_root bundles/transunet "${common[@]}" $(tiny_model_path transunet) ;;
p2)
  # option A: SDF failure simulation online (the augment shards hold the same transform's output)
  stage p2_train "$CAP_P2" $PY -m monai.bundle run --config_file "$(configs sam_refiner train)" --bundle_root bundles/sam_refiner "${common[@]}" $(tiny_model_path sam_refiner) --sam_checkpoint "" \
      --epochs "$E2" --batch_size 8 --samples_per_image "$SPI" --curriculum "{'start_sharpness': 5.0}"
  stage p2_eval "$CAP_EVAL" $PY -m monai.bundle run --config_file "$(configs sam_refiner train evaluate)" --bundle_root bundles/sam_refiner "${common[@]}" $(tiny_model_path sam_refiner) \
      --sam_checkpoint "" ;;
p3)
  stage p3_train "$CAP_P3" $PY -m monai.bundle run --config_file "$(configs ultrarefiner train)" --bundle_root bundles/ultrarefiner "${common[@]}" $(tiny_model_path ultrarefiner) --sam_checkpoint "" \
      --epochs "$E3"
  stage p3_eval "$CAP_EVAL" $PY -m monai.bundle run --config_file "$(configs ultrarefiner train evaluate)" --bundle_root bundles/ultrarefiner "${common[@]}" $(tiny_model_path ultrarefiner) \
      --sam_checkpoint ""
  stage p3_eval_iter2 "$CAP_EVAL" $PY -m monai.bundle run --config_file "$(configs ultrarefiner train evaluate)" --bundle_root bundles/ultrarefiner "${common[@]}" $(tiny_model_path ultrarefiner) \
      --sam_checkpoint "" --iterations 2
  stage p3_eval_gate "$CAP_EVAL" $PY -m monai.bundle run --config_file "$(configs ultrarefiner train evaluate)" --bundle_root bundles/ultrarefiner "${common[@]}" $(tiny_model_path ultrarefiner) \
      --sam_checkpoint "" --quality_gate True ;;
*) echo "unknown stage $s"; exit 2 ;;
esac; done
echo "done: $STAGES" | tee -a "$OUT/summary.txt"
