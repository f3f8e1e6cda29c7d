"""Readers for the distributed folder layouts of the breast-ultrasound datasets.

A reader lists ``RawSample``s (image file, its mask files, class, patient) and ``BadFile``s (orphan
masks, images without a mask, ...) without decoding pixels; :mod:`ultrarefiner.data.preprocess` does the
rest. Every listing is sorted by name so the result never depends on file-system order.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ultrarefiner.data.imaging import IMAGE_SUFFIXES

KNOWN_DATASETS = ("BUSI", "BUSBRA", "BUS", "BUS_UC", "BUS_UCLM")


@dataclass
class RawSample:
    """One image of a raw dataset and the mask files that belong to it."""

    dataset: str
    key: str  # output file stem, unique within the dataset
    image: Path
    masks: list[Path]
    class_name: str | None = None  # None: derive later (colour-coded masks) or "unknown"
    patient: str | None = None  # patient id where the dataset provides one
    official_fold: int | None = None
    colour_coded: bool = False  # BUS_UCLM: class encoded as mask colour
    source: str = ""  # path relative to the dataset root, for the datalist


@dataclass
class BadFile:
    file: str
    reason: str


@dataclass
class Listing:
    samples: list[RawSample] = field(default_factory=list)
    bad: list[BadFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name
    )


def _safe(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("_")


def _pair_by_stem(
    listing: Listing,
    dataset: str,
    root: Path,
    images: list[Path],
    masks: list[Path],
    mask_stem: Callable[[str], str],
    **fields,
) -> list[RawSample]:
    """Pair images and masks whose stems match (after ``mask_stem``); unmatched files become BadFiles."""
    by_stem = {mask_stem(m.stem): m for m in masks}
    img_stems = {p.stem for p in images}
    out = []
    for img in images:
        m = by_stem.get(img.stem)
        if m is None:
            listing.bad.append(BadFile(str(img), "image without mask"))
            continue
        out.append(RawSample(dataset, _safe(img.stem), img, [m], source=str(img.relative_to(root)), **fields))
    for stem, m in sorted(by_stem.items()):
        if stem not in img_stems:
            listing.bad.append(BadFile(str(m), "mask without image"))
    return out


_BUSI_MASK = re.compile(r"^(?P<base>.+)_mask(?:_(?P<idx>\d+))?$")
_BUSI_NUM = re.compile(r"^(?P<cls>[A-Za-z]+) \((?P<n>\d+)\)$")


def read_busi(root: Path) -> Listing:
    """BUSI: ``Dataset_BUSI_with_GT/<class>/'<class> (N).png'`` + ``'<class> (N)_mask[_k].png'``.

    The class folders may also sit directly under ``root``. Several masks of one image are merged later
    (logical OR).
    """
    listing = Listing()
    base = root / "Dataset_BUSI_with_GT" if (root / "Dataset_BUSI_with_GT").is_dir() else root
    class_dirs = sorted((d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)
    if not class_dirs:
        listing.bad.append(BadFile(str(base), "no class folders (benign/malignant/normal) found"))
    for cdir in class_dirs:
        images: dict[str, Path] = {}
        masks: dict[str, list[Path]] = {}
        for p in _files(cdir):
            m = _BUSI_MASK.match(p.stem)
            if m:
                masks.setdefault(m.group("base"), []).append(p)
            else:
                images[p.stem] = p
        for stem, img in sorted(images.items()):
            if stem not in masks:
                listing.bad.append(BadFile(str(img), "image without mask"))
                continue
            num = _BUSI_NUM.match(stem)
            key = f"{cdir.name.lower()}_{int(num.group('n')):04d}" if num else _safe(f"{cdir.name.lower()}_{stem}")
            listing.samples.append(
                RawSample(
                    "BUSI",
                    key,
                    img,
                    sorted(masks[stem], key=lambda p: p.name),
                    class_name=cdir.name.lower(),
                    source=str(img.relative_to(root)),
                )
            )
        for stem in sorted(set(masks) - set(images)):
            for m in masks[stem]:
                listing.bad.append(BadFile(str(m), "mask without image"))
    return listing


def _read_csv(path: Path, delimiter: str = ",") -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return [
            {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            for row in csv.DictReader(f, delimiter=delimiter)
        ]


def read_busbra(root: Path) -> Listing:
    """BUS-BRA: ``Images/bus_NNNN-{l,r,s}.png`` + ``Masks/mask_NNNN-{l,r,s}.png``.

    ``bus_data.csv`` gives the patient (``Case``) and class (``Pathology``); ``5-fold-cv.csv`` the official
    patient-level folds (``kFold``). Without ``bus_data.csv`` the patient is unknown and each image is its
    own group (a note says so in the report).
    """
    listing = Listing()
    samples = _pair_by_stem(
        listing,
        "BUSBRA",
        root,
        _files(root / "Images"),
        _files(root / "Masks"),
        lambda s: "bus_" + s[len("mask_") :] if s.startswith("mask_") else s,
    )
    info: dict[str, dict[str, str]] = {}
    if (root / "bus_data.csv").is_file():
        info = {r.get("ID", ""): r for r in _read_csv(root / "bus_data.csv")}
    else:
        listing.notes.append("bus_data.csv not found: patients unknown, images grouped only by near-duplicates")
    folds: dict[str, int] = {}
    if (root / "5-fold-cv.csv").is_file():
        rows = _read_csv(root / "5-fold-cv.csv")
        values = sorted({int(r["kFold"]) for r in rows if r.get("kFold", "").lstrip("-").isdigit()})
        folds = {r["ID"]: values.index(int(r["kFold"])) for r in rows if r.get("kFold", "").lstrip("-").isdigit()}
    for s in samples:
        row = info.get(s.image.stem)
        if row is not None:
            s.patient = row.get("Case") or None
            s.class_name = (row.get("Pathology") or "").lower() or None
        elif info:
            listing.notes.append(f"{s.image.name}: not in bus_data.csv")
        s.official_fold = folds.get(s.image.stem)
        s.class_name = s.class_name or "unknown"
    listing.samples = samples
    return listing


def read_bus(root: Path) -> Listing:
    """BUS (UDIAT Dataset B): ``original/NNNNNN.png`` + ``GT/NNNNNN.png``."""
    listing = Listing()
    listing.samples = _pair_by_stem(
        listing, "BUS", root, _files(root / "original"), _files(root / "GT"), lambda s: s, class_name="unknown"
    )
    return listing


def read_bus_uc(root: Path) -> Listing:
    """BUS_UC: ``{Benign,Malignant}/{images,masks}/NNN.png``, or ``All/{images,masks}``."""
    listing = Listing()
    class_dirs = [d for d in sorted(root.iterdir(), key=lambda d: d.name) if d.is_dir() and (d / "images").is_dir()]
    by_class = [d for d in class_dirs if d.name.lower() != "all"] or class_dirs
    for cdir in by_class:
        cls = cdir.name.lower() if cdir.name.lower() != "all" else "unknown"
        for s in _pair_by_stem(
            listing, "BUS_UC", root, _files(cdir / "images"), _files(cdir / "masks"), lambda s: s, class_name=cls
        ):
            s.key = _safe(f"{cdir.name.lower()}_{s.key}")
            listing.samples.append(s)
    if not by_class:
        listing.bad.append(BadFile(str(root), "no {Benign,Malignant,All}/images folders found"))
    return listing


def read_bus_uclm(root: Path) -> Listing:
    """BUS-UCLM: ``images/XXXX_NNN.png`` + colour-coded ``masks/XXXX_NNN.png``; patient = ``XXXX``.

    Class comes from ``INFO.csv`` (``;``-separated) when it has a label column, else from the mask colour.
    """
    listing = Listing()
    samples = _pair_by_stem(
        listing, "BUS_UCLM", root, _files(root / "images"), _files(root / "masks"), lambda s: s, colour_coded=True
    )
    labels: dict[str, str] = {}
    if (root / "INFO.csv").is_file():
        for row in _read_csv(root / "INFO.csv", delimiter=";"):
            name = Path(row.get("Image", row.get("image", ""))).stem
            label = row.get("Label", row.get("label", row.get("Class", "")))
            if name and label:
                labels[name] = label.lower()
    for s in samples:
        s.patient = s.image.stem.split("_")[0]
        s.class_name = labels.get(s.image.stem)
    listing.samples = samples
    return listing


def read_folder(root: Path, dataset: str) -> Listing:
    """Generic layout: ``images/`` and ``masks/`` with equal stems (any image suffix)."""
    listing = Listing()
    listing.samples = _pair_by_stem(
        listing, dataset, root, _files(root / "images"), _files(root / "masks"), lambda s: s, class_name="unknown"
    )
    return listing


READERS: dict[str, Callable[[Path], Listing]] = {
    "BUSI": read_busi,
    "BUSBRA": read_busbra,
    "BUS": read_bus,
    "BUS_UC": read_bus_uc,
    "BUS_UCLM": read_bus_uclm,
}


def list_dataset(raw_root: Path, name: str, layout: str = "auto") -> Listing:
    """List ``raw_root/name`` with its reader (``layout="folder"`` forces the generic reader)."""
    root = Path(raw_root) / name
    if not root.is_dir():
        listing = Listing()
        listing.bad.append(BadFile(str(root), "dataset folder not found"))
        return listing
    if layout == "folder" or name not in READERS:
        return read_folder(root, name)
    return READERS[name](root)
