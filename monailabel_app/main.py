"""MONAI Label app serving the UltraRefiner bundles on 2D breast-ultrasound PNG studies.

Start (from the repository root, in the MONAI Label environment that ``.ci/run`` creates):

    .venv-monailabel/bin/monailabel start_server --app monailabel_app --studies /path/to/pngs \
        --host 127.0.0.1 --port 8000

Models (``ultrarefiner.zoo.registry.BUNDLES``; one is served when its weights file exists):

* ``transunet``     automatic: ``bundles/transunet/configs/inference.json``;
* ``ultrarefiner``  automatic, refined + coarse masks: when ``bundles/ultrarefiner/configs/inference.json`` exists;
* ``sam_refiner``   interactive (clicks, ROI box, existing label): the ``sam_refiner`` bundle's network when its
  inference config exists, else (or with ``--conf sam_refiner_network direct``) ``SAMRefiner`` around
  ``build_sam`` (LiteMedSAM's packaged weights by default).

Train tasks run each bundle's ``configs/train.json`` on the labelled studies.

App options (``--conf KEY VALUE``):

* ``bundles``                     bundles folder (default: ``bundles/`` of the installed ultrarefiner repository);
* ``models``                      comma-separated subset of the models to load (default: all);
* ``<model>_checkpoint``          weights to serve (default ``<bundles>/<model>/models/model.pt``);
* ``<model>_overrides``           JSON config overrides, for inference and training (e.g. ``{"img_size": 32}``);
  for ``sam_refiner`` without a bundle config: ``build_tiny_sam`` arguments when the model type is ``tiny``;
* ``sam_refiner_network``         ``bundle`` (default: the sam_refiner bundle's ``network_def`` when its inference
  config exists) or ``direct`` (``SAMRefiner`` around ``build_sam``/``build_tiny_sam``, no bundle needed);
* ``sam_refiner_model_type``      direct only: ``lite_medsam`` (default), ``vit_b``, ``vit_l``, ``vit_h`` or ``tiny``;
* ``sam_refiner_preprocessing``   direct only: the model's own by default (``litemedsam``/``medsam``), or ``sam``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from lib.infers import BundleSegmentation, SamRefinerInteractive
from lib.trainers import BundleTrain
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from ultrarefiner.zoo.registry import BUNDLES, bundles_root
from ultrarefiner.zoo.serving import BundlePredictor, InteractivePredictor

logger = logging.getLogger(__name__)


class UltraRefinerApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.bundles = bundles_root(conf.get("bundles"))
        wanted = conf.get("models", "all")
        self.models = list(BUNDLES) if wanted == "all" else [m.strip() for m in wanted.split(",") if m.strip()]
        unknown = sorted(set(self.models) - set(BUNDLES))
        if unknown:
            raise ValueError(f"--conf models: unknown {unknown}; known {sorted(BUNDLES)}")
        self.model_dir = Path(app_dir) / "model"
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="UltraRefiner",
                         description="Breast-ultrasound lesion segmentation: TransUNet + SAM refiner bundles",
                         version="0.1.0", labels={"lesion": 1})

    # ------------------------------------------------------------------------------------------ conf
    def _checkpoint(self, name: str) -> Path:
        value = self.conf.get(f"{name}_checkpoint")
        return Path(value).resolve() if value else self.bundles / name / "models" / "model.pt"

    def _overrides(self, name: str) -> dict[str, Any]:
        value = self.conf.get(f"{name}_overrides", "")
        try:
            overrides = json.loads(value) if value else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"--conf {name}_overrides is not JSON: {value!r} ({e})") from e
        if not isinstance(overrides, dict):
            raise ValueError(f"--conf {name}_overrides must be a JSON object, got {value!r}")
        return overrides

    # ------------------------------------------------------------------------------------------ tasks
    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for name in self.models:
            entry, bundle = BUNDLES[name], self.bundles / name
            checkpoint = self._checkpoint(name)
            if entry.interactive:
                predictor = InteractivePredictor(
                    bundle, checkpoint, self._overrides(name),
                    model_type=self.conf.get(f"{name}_model_type", "lite_medsam"),
                    preprocessing=self.conf.get(f"{name}_preprocessing") or None,
                    use_bundle_config=self.conf.get(f"{name}_network", "bundle") != "direct",
                )
                task: InferTask = SamRefinerInteractive(predictor, entry.description)
            elif (bundle / "configs" / "inference.json").is_file():
                predictor = BundlePredictor(bundle, checkpoint, self._overrides(name), entry.outputs)
                task = BundleSegmentation(predictor, entry.description)
            else:
                logger.info("model %s: %s/configs/inference.json not there yet, not served", name, bundle)
                continue
            if not task.is_valid():
                logger.warning("model %s: weights %s not found; give them with --conf %s_checkpoint PATH",
                               name, checkpoint, name)
            infers[name] = task
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        trainers: dict[str, TrainTask] = {}
        for name in self.models:
            bundle = self.bundles / name
            if (bundle / "configs" / "train.json").is_file():
                work = self.model_dir / name
                os.makedirs(work, exist_ok=True)
                trainers[name] = BundleTrain(bundle, work, self._checkpoint(name), self._overrides(name))
        return trainers
