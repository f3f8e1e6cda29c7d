"""Shared fixtures: tiny raw dataset trees in every supported layout, and the real BUSI location."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
# The only way tests find data outside the repository: the real BUSI folder (holding Dataset_BUSI_with_GT/), e.g.
# ../shared/data/BUSI, which .ci/run sets. Unset or missing: the tests that need it skip.
BUSI_ENV = "ULTRAREFINER_BUSI_ROOT"


# Integration tier: whole bundle runs, CLI commands end to end, servers, fresh virtual environments, real data. Marked
# slow here, in one place, so that `pytest -m "not slow"` runs every phase's unit tests alone (a few minutes), and
# `pytest tests` (CI) runs both tiers.
INTEGRATION_MODULES = frozenset({
    "test_bundle_transunet", "test_bundle_sam_refiner", "test_bundle_ultrarefiner", "test_bundle_options",
    "test_busi_real", "test_cli", "test_export_bundle", "test_mlflow_tracking", "test_monailabel_app",
    "test_wheel_install", "test_zoo_ci",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in INTEGRATION_MODULES:
            item.add_marker(pytest.mark.slow)


def busi_root() -> Path:
    """The real BUSI folder from ``$ULTRAREFINER_BUSI_ROOT``; skips the calling test when unset or missing."""
    value = os.environ.get(BUSI_ENV, "").strip()
    if not value:
        pytest.skip(f"real BUSI data: {BUSI_ENV} is not set")
    root = Path(value).expanduser().absolute()
    if not (root / "Dataset_BUSI_with_GT").is_dir():
        pytest.skip(f"real BUSI data not found at {root} ({BUSI_ENV})")
    return root


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    img.save(path)
    return path


def blob(h: int = 40, w: int = 48, cy: int = 20, cx: int = 24, r: int = 8) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8) * 255


def scan(seed: int, h: int = 40, w: int = 48) -> np.ndarray:
    """A random grey image; distinct seeds give images that are far apart in difference-hash space."""
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


@pytest.fixture
def make_scan():
    return scan


@pytest.fixture
def raw_trees(tmp_path: Path) -> Path:
    """R/ with one small dataset per layout (3-8 usable images each), no bad files."""
    root = tmp_path / "raw"
    busi = root / "BUSI" / "Dataset_BUSI_with_GT"
    for i in range(1, 7):
        save(busi / "benign" / f"benign ({i}).png", np.stack([scan(i)] * 3, -1))  # RGB image
        save(busi / "benign" / f"benign ({i})_mask.png", blob(), "1")  # 1-bit mask
    rgba = np.zeros((40, 48, 4), np.uint8)
    rgba[..., 3] = 255  # opaque alpha everywhere: the max over channels would be all-lesion
    rgba[5:15, 5:15, :3] = 255
    save(busi / "benign" / "benign (6)_mask_1.png", rgba)
    for i in range(1, 5):
        save(busi / "malignant" / f"malignant ({i}).png", scan(100 + i))
        save(busi / "malignant" / f"malignant ({i})_mask.png", blob(r=5))
    save(busi / "normal" / "normal (1).png", scan(200))
    save(busi / "normal" / "normal (1)_mask.png", np.zeros((40, 48, 3), np.uint8))

    bra = root / "BUSBRA"
    rows, folds = ["ID,Case,Pathology"], ["ID,kFold"]
    for n in range(1, 9):
        for side in "lr" if n <= 2 else "s":
            name = f"{n:04d}-{side}"
            save(bra / "Images" / f"bus_{name}.png", scan(300 + n * 2 + (side == "r")))
            save(bra / "Masks" / f"mask_{name}.png", blob(), "1")
            rows.append(f"bus_{name},{n},{'malignant' if n % 2 else 'benign'}")
            folds.append(f"bus_{name},{(n % 4) + 1}")
    (bra / "bus_data.csv").write_text("\n".join(rows) + "\n")
    (bra / "5-fold-cv.csv").write_text("\n".join(folds) + "\n")

    for i in range(1, 7):
        save(root / "BUS" / "original" / f"{i:06d}.png", scan(400 + i))
        save(root / "BUS" / "GT" / f"{i:06d}.png", blob())
    for cls, off in (("Benign", 500), ("Malignant", 600)):
        for i in range(1, 4):
            save(root / "BUS_UC" / cls / "images" / f"{i:03d}.png", scan(off + i))
            save(root / "BUS_UC" / cls / "masks" / f"{i:03d}.png", blob())
    for j, (patient, colour) in enumerate(
        [
            ("ALFA", (0, 255, 0)),
            ("ALFA", (0, 255, 0)),
            ("BETA", (255, 0, 0)),
            ("GAMA", (0, 255, 0)),
            ("DELT", (255, 0, 0)),
            ("EPSI", (0, 0, 0)),
        ]
    ):
        name = f"{patient}_{j:03d}"
        save(root / "BUS_UCLM" / "images" / f"{name}.png", scan(700 + j))
        mask = np.zeros((40, 48, 3), np.uint8)
        mask[blob() > 0] = colour
        save(root / "BUS_UCLM" / "masks" / f"{name}.png", mask)
    for i in range(1, 6):
        save(root / "OTHER" / "images" / f"case_{i}.png", scan(800 + i))
        save(root / "OTHER" / "masks" / f"case_{i}.png", blob())
    return root
