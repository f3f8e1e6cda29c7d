"""Reading raw ultrasound images and masks in whatever PNG/JPEG/BMP/TIFF flavour the datasets ship, and masks
saved as 2D NIfTI (MONAI's ``SaveImage`` default).

Images become 8-bit grayscale (H, W); masks become boolean (H, W). Every failure raises
:class:`BadInputError` naming the file, so batch jobs can report and skip it.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ultrarefiner.errors import BadInputError, BadOptionError
from ultrarefiner.utils.flags import parse_list

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
MASK_SUFFIXES = IMAGE_SUFFIXES + NIFTI_SUFFIXES  # masks may also be NIfTI; images are 2D picture files


def file_stem(path: str | os.PathLike) -> str:
    """The name without its suffix, both parts of ``.nii.gz`` included (``Path.stem`` keeps ``a.nii``)."""
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def image_files(folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """The files of ``folder`` ending in one of ``suffixes`` (any case), hidden ones left out, sorted."""
    return sorted(f for f in folder.iterdir()
                  if f.is_file() and not f.name.startswith(".") and f.name.lower().endswith(suffixes))


_PART = re.compile(r"_(\d+)$")


def mask_parts(folder: str | os.PathLike, postfix: str,
               suffixes: tuple[str, ...] = MASK_SUFFIXES) -> dict[str, list[Path]]:
    """Further mask files of one image, ``<stem><postfix>_<k>.*`` (BUSI's ``<stem>_mask_1.png`` holds a second
    lesion of ``<stem>``), by stem, in the order of ``k``. Empty without a postfix: there ``<stem>_1`` may be the
    mask of an image named ``<stem>_1``."""
    if not postfix:
        return {}
    out: dict[str, list[tuple[int, Path]]] = {}
    for f in image_files(Path(folder), suffixes):
        name = file_stem(f)
        part = _PART.search(name)
        if part and name[: part.start()].endswith(postfix) and part.start() > len(postfix):
            out.setdefault(name[: part.start() - len(postfix)], []).append((int(part.group(1)), f))
    return {stem: [f for _, f in sorted(parts)] for stem, parts in out.items()}


def exclude_patterns(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """File-name patterns (``fnmatch``: ``*``, ``?``, ``[seq]``) as a tuple: ``"*_mask*"``, ``"*_mask*,*_seg*"``
    (split at commas, as the CLI passes them) or a list; None or empty: none.

    Raises:
        BadOptionError: a pattern holds a path separator (patterns match file names, not paths).
    """
    patterns = tuple(parse_list(value, "exclude"))
    bad = [p for p in patterns if "/" in p or "\\" in p]
    if bad:
        raise BadOptionError(f"exclude patterns match file names, not paths: got {', '.join(map(repr, bad))}")
    return patterns


def excluded(name: str, patterns: Sequence[str]) -> bool:
    """Whether the file name ``name`` matches one of ``patterns`` (any case, as the image suffixes are matched)."""
    return any(fnmatch.fnmatchcase(name.lower(), p.lower()) for p in patterns)


# <stem>_mask.png, <stem>_mask_1.png (BUSI), <stem>_seg.png (MONAI's SaveImage), <stem>_label.png, <stem>_gt.png
_MASK_NAME = re.compile(r"^(?P<stem>.+)_(?P<word>mask|seg|label|gt)(_\d+)?$", re.IGNORECASE)
_warned_folders: set[tuple[str, int]] = set()  # (folder, number of files): warn once per listing, not per caller


def masks_beside_images(files: Sequence[Path]) -> dict[str, list[Path]]:
    """The files of ``files`` named like a mask of another one (``<stem>_mask.*``, ``<stem>_mask_<k>.*``,
    ``<stem>_seg.*``, ``<stem>_label.*``, ``<stem>_gt.*`` beside ``<stem>.*``), by the word (``mask``, ...) in its
    case. Only a hint: an image may be named so, and whether it is a mask is the user's call (``--exclude``)."""
    stems = {file_stem(f) for f in files}
    found: dict[str, list[Path]] = {}
    for f in files:
        m = _MASK_NAME.match(file_stem(f))
        if m and m["stem"] in stems:
            found.setdefault(m["word"], []).append(f)
    return found


def _warn_masks_beside(folder: Path, files: Sequence[Path]) -> None:
    """Warn, once per folder, when image files of ``folder`` are named like masks of the images beside them (a BUSI
    class folder): they would be segmented or refined as images without a word."""
    beside = masks_beside_images(files)
    key = (str(folder.resolve()), len(files))
    if not beside or key in _warned_folders:
        return
    _warned_folders.add(key)
    n = sum(map(len, beside.values()))
    examples = ", ".join(f.name for group in beside.values() for f in group[:2])
    patterns = ",".join(f"*_{word}*" for word in beside)
    logger.warning(f"{n} of the {len(files)} image files of {folder} are named like masks of the images beside them "
                   f"(e.g. {examples}) and are read as images: pass --exclude '{patterns}' to leave them out")


def folder_image_files(folder: str | os.PathLike, what: str = "input",
                       exclude: str | Iterable[str] | None = None) -> list[Path]:
    """The image files of ``folder`` (``image_files``: any of ``IMAGE_SUFFIXES``, hidden ones left out, sorted, not
    recursive): what ``refine``, ``predict`` and the bundles' inference read from a folder. A folder that yields
    nothing is an error, not an empty run: an inference that silently writes nothing looks like success.

    ``exclude``: file-name patterns to leave out (``exclude_patterns``), e.g. ``*_mask*`` for a BUSI class folder,
    where the masks lie beside the images; how many files they left out is logged. Without it, files named like
    masks of the images beside them (``masks_beside_images``) are kept and a warning suggests the patterns.

    Raises:
        BadInputError: naming ``folder`` (the ``what`` folder) when it does not exist, is a file, holds no image, or
            holds none that ``exclude`` leaves.
        BadOptionError: a pattern holds a path separator.
    """
    patterns = exclude_patterns(exclude)
    folder = Path(folder)
    if not folder.exists():
        raise BadInputError(folder, f"{what} folder not found")
    if not folder.is_dir():
        raise BadInputError(folder, f"{what} must be a folder")
    files = image_files(folder)
    if not files:
        raise BadInputError(folder, f"no image files ({', '.join(IMAGE_SUFFIXES)}) in the {what} folder")
    kept: list[Path] = []
    left: list[Path] = []
    for f in files:  # one match per file
        (left if excluded(f.name, patterns) else kept).append(f)
    if not kept:
        raise BadInputError(folder, f"the exclude patterns {', '.join(patterns)} match every image file of the {what} "
                                    f"folder ({len(files)}), leaving none")
    if left:
        logger.info(f"{len(left)} of {len(files)} image files of {folder} left out by the exclude patterns "
                    f"{', '.join(patterns)} (e.g. {', '.join(f.name for f in left[:3])}); {len(kept)} kept")
    if not patterns:
        _warn_masks_beside(folder, kept)
    return kept


def open_image(path: str | os.PathLike) -> Image.Image:
    """The decoded PIL image; BadInputError naming the file when it is missing, unreadable, truncated or a
    decompression bomb."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()  # force decoding now: truncated files fail here, not later in a worker
    except FileNotFoundError as e:
        raise BadInputError(path, "file not found") from e
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise BadInputError(path, f"unreadable image ({type(e).__name__}: {e})") from e
    return img


WIDE_MODES = ("I;16", "I;16B", "I;16L", "I", "F")  # 16/32-bit integer and float pixels


def _source(img: Image.Image) -> str:
    """The file a PIL image was opened from (for error messages)."""
    return str(getattr(img, "filename", "") or "image")


def to_gray_uint8(img: Image.Image) -> np.ndarray:
    """(H, W) uint8: luminance for colour images; 16-bit and float images rescaled by their maximum (from their
    minimum when it is negative: float images of z-scores or Hounsfield-like values, which would wrap around in 8
    bits).

    Raises:
      BadInputError: a float image with NaN or infinite values; names the file.
    """
    if img.mode in WIDE_MODES:
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise BadInputError(_source(img), "image holds NaN or infinite values")
        low = min(arr.min(initial=0), 0.0)  # black stays black unless values go below 0
        span = arr.max(initial=0) - low
        return np.zeros(arr.shape, np.uint8) if span <= 0 else np.round((arr - low) / span * 255).astype(np.uint8)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    # "L" conversion uses ITU-R 601 luminance and drops alpha (alpha may be 255 everywhere in masks)
    return np.asarray(img.convert("L"), dtype=np.uint8)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as (H, W) uint8 grayscale."""
    return to_gray_uint8(open_image(path))


def mask_levels(values: np.ndarray, path: str | os.PathLike = "mask") -> np.ndarray:
    """(H, W) uint8 mask levels on the 0-255 scale (lesion > 127; a soft mask keeps p * 255) from a mask's stored
    values, by what their range says they are:

    - at most 1: a 0/1 label map (nnU-Net, MONAI's ``SaveImage`` of a binary label) or float probabilities: x 255;
    - at most 255: 8-bit levels (0/255, probability * 255), also when stored in 16 bits or as floats;
    - 256-65535, integers: 16-bit levels (MONAI's ``SaveImage`` scales probabilities by 65535), or a binary mask
      when only 0 and one other value occur (e.g. 0/4095).

    Rescaling by the maximum, as images are, would turn a soft mask whose highest probability is 0.4 into a lesion.

    Raises:
      BadInputError: NaN or infinite values, negative values (logits?) or floats above 255; names ``path``.
    """
    if values.dtype == np.uint8:
        return values * np.uint8(255) if values.max(initial=0) == 1 else values
    v = values.astype(np.float64)
    if not np.isfinite(v).all():
        raise BadInputError(path, "mask holds NaN or infinite values")
    low, top = v.min(initial=0), v.max(initial=0)
    if low < 0:
        raise BadInputError(path, f"mask holds negative values (down to {low:g}; logits?): save probabilities in "
                                  f"[0, 1] or levels 0-255")
    if top <= 1:
        scaled = v * 255
    elif top <= 255:
        scaled = v
    elif top <= 65535 and np.array_equal(v, np.round(v)):
        two_levels = not np.any((v != 0) & (v != top))
        scaled = (v > 0) * 255.0 if two_levels else v * (255 / 65535)
    else:
        raise BadInputError(path, f"mask values up to {top:g}: expected probabilities in [0, 1], levels 0-255 or "
                                  f"16-bit levels 0-65535")
    return np.round(scaled).astype(np.uint8)


def _stored_values(img: Image.Image) -> np.ndarray:
    """(H, W) a mask's values: as stored for 16-bit, 32-bit and float images, the gray level of a gray one, the
    brightest channel of a colour one (uint8). A drawing in pure red or blue is lesion: its luminance, 76 or 29,
    would read it as background; a gray mask saved as RGB gives its gray level either way."""
    if img.mode in WIDE_MODES:
        return np.asarray(img)
    if img.mode in ("1", "L", "LA", "La"):
        return to_gray_uint8(img)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).max(axis=-1)  # alpha is mask_of's concern


def nifti_values(path: str | os.PathLike) -> np.ndarray:
    """(H, W) the stored values of a 2D NIfTI mask (one slice: trailing axes of size 1 are dropped).

    The voxel array is read x first, as MONAI's ``SaveImage`` (of images loaded by ``LoadImage``), ITK and this
    package's ``--nifti`` outputs write a 2D picture: axis 0 runs along the columns. The affine is not applied:
    a PNG has no orientation to align it with, and an LPS/RAS flag would flip the mask against its image.

    Raises:
      BadInputError: missing or unreadable file, or not one 2D slice; names the file.
    """
    import nibabel as nib

    if not Path(path).is_file():
        raise BadInputError(path, "file not found")
    try:
        values = np.asanyarray(nib.load(str(path)).dataobj)  # scl_slope/inter applied; decoding happens here
    except Exception as e:  # nibabel raises ImageFileError, gzip's BadGzipFile, EOFError, ...
        raise BadInputError(path, f"unreadable NIfTI ({type(e).__name__}: {e})") from e
    while values.ndim > 2 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.ndim != 2:
        raise BadInputError(path, f"NIfTI of shape {tuple(values.shape)}: a mask must be one 2D slice")
    return np.ascontiguousarray(values.T)


def transposed_hint(path: str | os.PathLike, shape: tuple[int, ...], expected: tuple[int, ...]) -> str:
    """``" (...)"`` when a NIfTI mask's size is the expected one transposed: it was saved row first."""
    if is_nifti(path) and tuple(shape) == tuple(expected)[::-1] and shape[0] != shape[1]:
        return " (the NIfTI array is read x first, as MONAI's SaveImage and ITK write it; this one was saved row first)"
    return ""


def _mask_values(path: str | os.PathLike) -> np.ndarray:
    return nifti_values(path) if is_nifti(path) else _stored_values(open_image(path))


def read_soft_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask or soft prediction as (H, W) uint8 on the 0-255 scale (``mask_levels``): 0/255 masks and probability
    * 255 maps as they are, 0/1 label maps as 0/255, float probabilities and 16-bit levels scaled to 0-255. Picture
    files and 2D NIfTI (``nifti_values``)."""
    return mask_levels(_mask_values(path), path)


def _alpha(img: Image.Image) -> np.ndarray | None:
    """The alpha channel (H, W) uint8 of an image with transparency (RGBA, LA, PA, P with a transparent colour)."""
    if not img.has_transparency_data:
        return None
    return np.asarray(img.convert("RGBA").getchannel("A"))


def read_mask(path: str | os.PathLike, colour_coded: bool = False) -> np.ndarray:
    """Read a mask as (H, W) bool: a picture by ``mask_of``'s rule, a 2D NIfTI (``nifti_values``) where its
    ``mask_levels`` exceed 127 (a 0/1 label map where it is 1, probabilities above 0.5)."""
    if is_nifti(path):
        return read_soft_mask(path) > 127
    return mask_of(open_image(path), colour_coded, path)


CLASS_MAP_MAX_VALUES = 16  # at most this many non-zero levels: class indices, not a soft mask's gradient


def read_label(path: str | os.PathLike, colour_coded: bool = False, classes_option: str = "") -> np.ndarray:
    """Read a ground-truth label as (H, W) bool: ``read_mask``, refusing two labels that it reads without error but
    wrongly, which would quietly teach or score the wrong lesion:

    - a multi-class label map (0 background, 1 benign, 2 malignant; nnU-Net and MONAI Label number classes this way)
      reads as blank wherever its maximum is 2 or more: ``mask_levels`` takes values up to 255 as 8-bit levels, and
      1 or 2 of 255 is background. A soft label of low probability (many levels) still reads blank, as it should;
    - an inverted mask (lesion black on white) reads as lesion along the whole image border with the background
      inside it, which no lesion is (on BUSI none touches more than two sides of its image).

    ``classes_option``: the caller's option that reads class maps (``read_classes``), named in the refusal.

    Raises:
      BadInputError: naming the file: with the values found, when a blank label holds only integer values, at most
        ``CLASS_MAP_MAX_VALUES`` distinct non-zero ones, the highest between 2 and 127; when the lesion runs along
        all four sides of the image and is not the whole image.
    """
    mask = read_mask(path, colour_coded)
    if mask.any():
        if _frames_the_image(mask):
            raise BadInputError(path, "label is lesion along the whole image border with background inside: an "
                                      "inverted mask? save the lesion white (255) on black (0)")
        return mask
    if colour_coded:
        return mask
    note = class_map_note(path, classes_option=classes_option)
    if note:
        raise BadInputError(path, f"label {note}")
    return mask


def class_map_note(path: str | os.PathLike, soft: bool = False, classes_option: str = "") -> str:
    """For a mask file that reads as no lesion: ``"holds only the values 0, 1, 2, which read as no lesion: a
    multi-class label map? ..."`` when its stored values look like class indices (integers, at most
    ``CLASS_MAP_MAX_VALUES`` distinct non-zero ones, the highest between 2 and 127: on the 8-bit scale 2 of 255 is
    background), else ``""``. A label like that is refused (``read_label``).

    ``soft``: the file may be a soft prediction or coarse mask, where a faint map quantised to 8 bits holds a few
    such levels too (0.05, 0.3 and 0.45 store 13, 76 and 115): then only maps with background 0 and indices up to
    ``CLASS_MAP_MAX_VALUES`` count, and the caller reports rather than refuses.

    ``classes_option``: the caller's option that reads class maps (``read_classes``), e.g. ``mask_classes``; the note
    then ends "; or pass --mask_classes with the lesion's values"."""
    values = _mask_values(path)  # (H, W): the levels read_mask thresholded
    found = np.unique(values[values != 0])
    top = CLASS_MAP_MAX_VALUES if soft else 127
    if not (0 < found.size <= CLASS_MAP_MAX_VALUES and 2 <= found.max() <= top
            and np.array_equal(found, np.round(found)) and (not soft or bool((values == 0).any()))):
        return ""
    shown = ", ".join(f"{v:g}" for v in [0, *found.tolist()])
    hint = f"; or pass --{classes_option} with the lesion's values" if classes_option else ""
    return (f"holds only the values {shown}, which read as no lesion: a multi-class label map? UltraRefiner "
            f"segments one lesion class; save the lesion as 255 (or 1, with 0 elsewhere), merging the classes that are "
            f"lesion{hint}")


def lesion_classes(value: str | int | Iterable[str | int] | None, name: str) -> tuple[int, ...]:
    """The class values of option ``name`` that count as lesion in a class map: ``"1,2"``, ``2``, ``(1, 2)`` (fire
    passes ``--x 1,2`` as a tuple) -> (1, 2), sorted; None or empty: () (the mask rule of ``read_mask`` applies).

    Raises:
        BadOptionError: naming ``--name``: a value that is not a whole number, or one below 1 (0 is background).
    """
    if isinstance(value, bool):
        raise BadOptionError(f"--{name}: expected class values such as 1,2; got {value!r}")
    items = parse_list([value] if isinstance(value, int) else value, name)
    given = ",".join(items)  # as typed: fire turns 1,2 into a tuple
    try:
        classes = sorted({int(v) for v in items})
    except ValueError:
        raise BadOptionError(f"--{name}: class values are whole numbers separated by commas (e.g. 1,2); got "
                             f"{given}") from None
    if classes and classes[0] < 1:
        raise BadOptionError(f"--{name}: 0 is the background of a class map; give the classes that are lesion "
                             f"(e.g. 1,2); got {given}")
    return tuple(classes)


def class_values(path: str | os.PathLike) -> np.ndarray:
    """(H, W) the class indices a class-map file stores: the values of a grayscale, 16-bit, 32-bit or float picture
    or of a 2D NIfTI (``nifti_values``), the palette indices of a palette PNG (VOC-style maps colour each class; the
    index is the class), the one level of a gray picture saved as RGB.

    Raises:
        BadInputError: naming the file: unreadable; a colour picture whose channels differ (its colours are not
            indices); values that are not whole numbers (a probability map is not a class map).
    """
    if is_nifti(path):
        values = nifti_values(path)
    else:
        img = open_image(path)
        if img.mode in ("P", "PA", "1", "L", "LA", "La") or img.mode in WIDE_MODES:
            values = np.asarray(img.getchannel(0) if img.mode in ("PA", "LA", "La") else img)
            values = values.astype(np.uint8) if values.dtype == bool else values
        else:
            rgb = np.asarray(img.convert("RGB"))
            if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                raise BadInputError(path, f"{img.mode} mask in colour: a class map stores class indices in one "
                                          f"channel (grayscale, palette PNG or NIfTI)")
            values = rgb[..., 0]
    if values.dtype.kind == "f":
        if not np.isfinite(values).all() or not np.array_equal(values, np.round(values)):
            raise BadInputError(path, "mask holds values that are not whole numbers (a probability map?): class "
                                      "values select lesion in a class map only")
    return values


def read_classes(path: str | os.PathLike, classes: Sequence[int]) -> tuple[np.ndarray, str]:
    """(H, W) bool lesion where the class map ``path`` (``class_values``) holds one of ``classes``, and a note
    (else ``""``) when that is nowhere although the file holds other non-zero values: ``"holds the values 0, 255,
    none of the classes 1, 2"`` (a 0/255 mask given class values, or an image with another class only)."""
    values = class_values(path)
    mask = np.isin(values, classes)
    if mask.any():
        return mask, ""
    found = np.unique(values[values != 0])
    if not found.size:
        return mask, ""
    shown = ", ".join(f"{v:g}" for v in [0, *found[:8].tolist()]) + (", ..." if found.size > 8 else "")
    return mask, f"holds the values {shown}, none of the classes {', '.join(map(str, classes))}"


def read_labels(paths: Sequence[str | os.PathLike], classes: Sequence[int] = (),
                classes_option: str = "") -> np.ndarray:
    """One label from the files of one image's lesions (BUSI ships ``<stem>_mask.png``, ``<stem>_mask_1.png``, ...):
    the union of their ``read_label`` masks, (H, W) bool.

    ``classes``: the label files are class maps, lesion where they hold one of these values (``read_classes``;
    the class-map and inverted-mask checks of ``read_label`` do not apply: the classes say what is lesion).
    ``classes_option``: the caller's option for ``classes``, which the refusal of a class map names.

    Raises:
      BadInputError: naming the part that is unreadable or refused, or whose size differs from the first file's.
    """
    def read(path: str | os.PathLike) -> np.ndarray:
        return read_classes(path, classes)[0] if classes else read_label(path, classes_option=classes_option)

    first, *rest = paths
    label = read(first)
    for part in rest:
        more = read(part)
        if more.shape != label.shape:
            raise BadInputError(part, f"label part is {more.shape[1]}x{more.shape[0]} (WxH), the label {first} "
                                      f"{label.shape[1]}x{label.shape[0]}")
        label |= more
    return label


def _frames_the_image(mask: np.ndarray) -> bool:
    """Whether ``mask`` (H, W) bool is set on every pixel of the image's border and not everywhere."""
    ring = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
    return bool(ring.all()) and not mask.all()


def mask_of(img: Image.Image, colour_coded: bool = False, path: str | os.PathLike | None = None) -> np.ndarray:
    """A decoded mask image as (H, W) bool.

    Args:
        img: the mask, as PIL decodes it.
        colour_coded: masks whose class is a colour (BUS_UCLM: green benign, red malignant, black
            background): any non-black pixel is lesion. Otherwise lesion = level > 127 (the brightest channel
            of a colour mask, ``_stored_values``), which is right for 1-bit, 8-bit, RGB (a red drawing
            included) and RGBA with a constant alpha, of the levels ``mask_levels`` reads: a 0/1
            label map is lesion where it is 1, a float map where p > 0.5, a 16-bit one above 32767 (or wherever
            it is non-zero when it has two levels).
        path: the file, for error messages (default: the image's own file name).

    A varying alpha channel carries the mask too: where the colour is the same everywhere (e.g. white, with
    the background transparent) the mask is the opaque region; otherwise it is what shows over black (bright
    and opaque). A mask whose opaque region is dark and whose bright region is transparent is refused
    (BadInputError): which of the two is the lesion cannot be told.
    """
    path = _source(img) if path is None else path
    if colour_coded:
        drawn = np.asarray(img.convert("RGB")).max(axis=-1) > 0
    else:
        drawn = mask_levels(_stored_values(img), path) > 127
    alpha = _alpha(img)
    if alpha is None or alpha.min() == alpha.max():  # a constant alpha carries nothing
        return drawn
    opaque = alpha > 127
    gray = np.asarray(img.convert("RGB").convert("L"))
    if gray.min() == gray.max():  # one colour everywhere: only the alpha channel draws the mask
        return opaque
    mask = drawn & opaque
    if opaque.any() and not mask.any():
        raise BadInputError(path, "RGBA mask with a dark opaque region and a bright transparent one: cannot tell "
                                  "which is the lesion; save the mask as 8-bit grayscale 0/255")
    return mask


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) from the header, without decoding pixels."""
    try:
        with Image.open(path) as img:
            w, h = img.size
    except Exception as e:
        raise BadInputError(path, f"unreadable image ({type(e).__name__}: {e})") from e
    return h, w
