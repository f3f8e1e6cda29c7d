"""MONAI Label train task: the bundle's ``configs/train.json`` on the studies labelled so far.

The labelled studies (datastore tag ``final``) become a ``datalist.json`` in the ``preprocess`` layout (folds over
near-duplicate groups), and ``python -m monai.bundle run`` trains on it with ``data_root``/``dataset_name`` pointing
there and ``model_path`` at the weights the infer task serves, so a finished run is served on the next request.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from ultrarefiner.utils.io import write_json
from ultrarefiner.zoo.serving import write_training_datalist

logger = logging.getLogger(__name__)

DATASET_NAME = "MONAILABEL"


class BundleTrain(TrainTask):
    def __init__(
        self,
        bundle_dir: Path,
        work_dir: Path,
        model_path: Path,
        overrides: Mapping[str, Any] | None = None,
        description: str = "",
    ) -> None:
        """
        Arguments:
          bundle_dir: the bundle (``configs/train.json``, ``metadata.json``, ``logging.conf``).
          work_dir: datalist and checkpoints of the runs (``<app>/model/<name>``).
          model_path: where the best weights are exported (the served checkpoint).
          overrides: fixed config overrides from the app conf (e.g. tiny test settings).
          description: shown by ``/info/``.
        """
        super().__init__(description or f"train bundle {bundle_dir.name} on the labelled studies")
        self.bundle_dir = bundle_dir
        self.config_file = bundle_dir / "configs" / "train.json"
        self.work_dir = work_dir
        self.model_path = model_path
        self.overrides = dict(overrides or {})
        with open(self.config_file, encoding="utf-8") as f:
            self.config_ids = set(json.load(f))  # top-level ids a request may override

    def config(self) -> dict[str, Any]:
        return {"max_epochs": 50, "n_splits": 5, "fold": 0, "pretrained_npz": "", "resume": False}

    def stats(self) -> dict[str, Any]:
        report = self.work_dir / "last_run.json"
        return json.loads(report.read_text()) if report.is_file() else {}

    def overrides_for(self, request: Mapping[str, Any], datalist: Path) -> dict[str, Any]:
        """Config overrides of one run: data, outputs, app-conf overrides, then the request's own."""
        ov: dict[str, Any] = {
            "bundle_root": str(self.bundle_dir),
            "data_root": str(datalist.parent.parent),
            "dataset_name": DATASET_NAME,
            "n_splits": json.loads(datalist.read_text())["n_splits"],
            "ckpt_root": str(self.work_dir / "checkpoints"),
            "model_path": str(self.model_path),
            "resume": False,
        }
        ov.update(self.overrides)
        if "max_epochs" in request:
            ov["epochs"] = int(request["max_epochs"])
        ov.update({k: v for k, v in request.items() if k in self.config_ids and k not in ("bundle_root",)})
        return ov

    def __call__(self, request: Mapping[str, Any], datastore: Datastore) -> dict[str, Any]:
        items = [d for d in datastore.datalist() if d.get("image") and d.get("label")]
        datalist = write_training_datalist(items, self.work_dir / "data", DATASET_NAME,
                                           n_splits=int(request.get("n_splits", 5)))
        ov = self.overrides_for(request, datalist)
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(self.config_file),
               "--meta_file", str(self.bundle_dir / "configs" / "metadata.json")]
        logging_conf = self.bundle_dir / "configs" / "logging.conf"
        if logging_conf.is_file():
            cmd += ["--logging_file", str(logging_conf)]
        for k, v in ov.items():
            cmd += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
        logger.info("train %s on %d labelled images: %s", self.bundle_dir.name, len(items), " ".join(cmd))
        res = subprocess.run(cmd, cwd=self.work_dir, env=os.environ.copy(), text=True, capture_output=True)
        sys.stdout.write(res.stdout[-20000:])
        sys.stderr.write(res.stderr[-20000:])
        summary = {"bundle": self.bundle_dir.name, "images": len(items), "returncode": res.returncode,
                   "model_path": str(self.model_path), "model_written": self.model_path.is_file(),
                   "overrides": {k: v for k, v in ov.items() if k not in ("bundle_root",)}}
        write_json(self.work_dir / "last_run.json", summary)
        if res.returncode != 0:
            raise RuntimeError(f"bundle {self.bundle_dir.name} training failed (exit {res.returncode}): "
                               f"{res.stderr[-2000:]}")
        return summary
