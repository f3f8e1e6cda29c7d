"""The project's MONAI bundles as served (MONAI Label app) and exported (Model Zoo): one entry per bundle.

Adding a bundle to the app and to ``export-bundle`` is one ``BundleEntry`` line here plus its folder under
``bundles/``. An automatic entry is served by running the bundle's own ``configs/inference.json`` on the image, so its
contract is the one ``bundles/transunet`` follows: the config reads every ``*.png`` of ``input_dir``, loads
``ckpt_path`` and writes one PNG mask per output under ``output_dir``, at a path given by a pattern with ``{stem}``
(the image file name without suffix), 0/255 or 0/1, at the image's native H x W.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ultrarefiner.errors import BadInputError

__all__ = ["BUNDLES", "BundleEntry", "bundles_root", "get_entry"]


@dataclass(frozen=True)
class BundleEntry:
    """How one bundle is served and exported.

    Attributes:
      name: folder name under ``bundles/`` and model name in the MONAI Label app.
      description: one line shown by the app's ``/info/``.
      interactive: True for a prompt-driven model (clicks, box, label); False for an automatic segmenter.
      outputs: automatic models: result name -> path of the PNG that ``inference.json`` writes per image, relative
        to ``output_dir``, with ``{stem}`` for the image name; the first one is the label returned by default.
      use_trace: ``ckpt_export`` traces instead of scripting (timm/segment-anything modules are not scriptable).
      net_id: config id of the network definition (``ckpt_export``/``verify_net_in_out``); the Model Zoo's CI
        always checks ``network_def``, so every bundle here keeps the default.
      trace_overrides: config overrides for the traced ``models/model.ts`` only (``export-bundle``): the exact
        MedSAM resize runs in numpy and a trace would freeze its result as a constant, so refiner bundles trace
        with the torch resize; ``input_shape`` (``ckpt_export``'s) fixes the trace size where the metadata allows
        any size (``export_bundle``'s ``spatial_shape`` replaces it).
    """

    name: str
    description: str
    interactive: bool = False
    outputs: Mapping[str, str] = field(default_factory=lambda: {"lesion": "{stem}_seg.png"})
    use_trace: bool = True
    net_id: str = "network_def"
    trace_overrides: Mapping[str, Any] = field(default_factory=dict)


BUNDLES: dict[str, BundleEntry] = {
    "transunet": BundleEntry("transunet", "TransUNet breast-ultrasound lesion segmentation (automatic)"),
    # phase 3: the layout of engines.inference.ultra_predict (refined/<name>.png, coarse/<name>.png, 0/255)
    "ultrarefiner": BundleEntry("ultrarefiner", "TransUNet + SAM refiner, coarse and refined lesion masks (automatic)",
                                outputs={"refined": "refined/{stem}.png", "coarse": "coarse/{stem}.png"},
                                trace_overrides={"image_resize": "torch"}),
    "sam_refiner": BundleEntry("sam_refiner", "SAM/MedSAM refiner from clicks, an ROI box and/or a label (interactive)",
                               interactive=True,  # metadata: any H x W ("*"), so the trace gets a fixed size
                               trace_overrides={"image_resize": "torch", "input_shape": [1, 2, 1024, 1024]}),
}


def get_entry(name: str) -> BundleEntry:
    """The registry entry of ``name``; a bundle folder unknown to the registry gets the automatic defaults."""
    return BUNDLES.get(name, BundleEntry(name, f"MONAI bundle {name}"))


def bundles_root(explicit: str | os.PathLike | None = None) -> Path:
    """The folder holding the bundles: ``explicit``, else ``$ULTRAREFINER_BUNDLES``, else ``bundles/`` of the
    repository this package is installed from (editable install)."""
    chosen = explicit or os.environ.get("ULTRAREFINER_BUNDLES")
    path = Path(chosen).expanduser().resolve() if chosen else Path(__file__).resolve().parents[2] / "bundles"
    if not path.is_dir():
        raise BadInputError(path, "bundles folder not found (give it explicitly, or set $ULTRAREFINER_BUNDLES)")
    return path
