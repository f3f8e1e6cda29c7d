"""The bundles' inference configs and the MONAI Label serving helpers read images and coarse masks by the package's
rules (``read_image``, ``read_soft_mask``), as ``refine`` does, whatever the file's storage.

Before, MONAI's ``PILReader`` handed the configs the stored values: a colour PNG became 3 channels (TransUNet and the
refiner refused it with a shape error), a 16-bit image was clipped to white by the 0-255 scaling (a silent garbage
input), a 16-bit soft coarse mask (p * 65535) became a lesion wherever p > 1/255. PIL's "L" conversion in the serving
helper clipped 16-bit images to white too."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from bundle_utils import REPO
from conftest import blob, save, scan
from ultrarefiner.data.imaging import read_image, read_soft_mask
from ultrarefiner.errors import BadInputError
from ultrarefiner.zoo.serving import load_image_uint8


def preprocessing(bundle: str):
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "inference.json"))
    return parser.get_parsed_content("preprocessing")


@pytest.fixture
def images(tmp_path):
    """The same grey scan stored as 8-bit grey, RGB, a palette image and 16-bit grey (x 257)."""
    gray = scan(7, 48, 64)
    return gray, {
        "gray": save(tmp_path / "gray.png", gray),
        "rgb": save(tmp_path / "rgb.png", gray, "RGB"),
        "palette": save(tmp_path / "palette.png", gray, "P"),
        "16-bit": save(tmp_path / "16bit.png", gray.astype(np.uint16) * 257),
    }


def test_images_read_alike_in_every_storage(images):
    gray, files = images
    assert Image.open(files["16-bit"]).mode == "I;16"
    for name, path in files.items():
        assert np.array_equal(read_image(path), gray), name
        served = load_image_uint8(path)  # colour stays RGB for the interactive refiner: its channels are the grey
        assert np.array_equal(served if served.ndim == 2 else served[..., 0], gray), name  # was all 255 for 16 bits
    transunet, refiner = preprocessing("transunet"), preprocessing("sam_refiner")
    coarse = save(files["gray"].parent / "coarse.png", blob(48, 64))
    reference = transunet({"image": str(files["gray"])})["image"]
    stacked = refiner({"image": str(files["gray"]), "coarse": str(coarse)})["image"]
    assert tuple(reference.shape) == (1, 224, 224) and tuple(stacked.shape) == (2, 48, 64)
    assert np.array_equal(stacked[0].numpy() * 255, gray.astype(np.float32))
    for name, path in files.items():
        assert torch.equal(transunet({"image": str(path)})["image"], reference), name
        assert torch.equal(refiner({"image": str(path), "coarse": str(coarse)})["image"], stacked), name


@pytest.mark.parametrize("storage", ["8-bit", "0/1", "16-bit soft", "16-bit unsure"])
def test_sam_refiner_coarse_masks_read_as_refine_reads_them(images, storage):
    gray, files = images
    tmp = files["gray"].parent
    p = np.where(blob(48, 64) > 0, 0.9, 0.1).astype(np.float32)
    p[0:4, 0:4] = 0.45
    if storage == "8-bit":
        coarse = save(tmp / "coarse.png", np.round(p * 255).astype(np.uint8))
    elif storage == "0/1":
        coarse = save(tmp / "coarse.png", (p > 0.5).astype(np.uint8))
    else:  # MONAI's SaveImage scale for 16-bit: p * 65535
        p = p * (0.5 if storage == "16-bit unsure" else 1)  # no pixel reaches 0.5
        coarse = save(tmp / "coarse.png", np.round(p * 65535).astype(np.uint16))
    got = preprocessing("sam_refiner")({"image": str(files["gray"]), "coarse": str(coarse)})["image"][1].numpy()
    assert np.array_equal(got * 255, read_soft_mask(coarse).astype(np.float32))
    assert np.array_equal(got > 0.5, p > 0.5)  # was every pixel above 1/255 for 16 bits


def test_float_images_with_negative_values_are_rescaled_from_their_minimum(tmp_path):
    z = (scan(3).astype(np.float32) - 128) / 40  # z-scores: about -3.2 to 3.2
    path = tmp_path / "z.tif"
    Image.fromarray(z, mode="F").save(path)
    expected = np.round((z - z.min()) / (z.max() - z.min()) * 255).astype(np.uint8)
    assert np.array_equal(read_image(path), expected)  # negative values wrapped around in 8 bits
    z[0, 0] = np.nan
    Image.fromarray(z, mode="F").save(path)
    with pytest.raises(BadInputError, match="NaN or infinite") as error:
        read_image(path)
    assert error.value.path == str(path)


def test_inference_datalists_take_every_image_suffix(tmp_path):
    """The bundles' inference reads JPEG, BMP and TIFF images too (it globbed *.png: a JPEG folder was 'no image'),
    pairs each with its coarse mask of any suffix, and refuses two images of one stem (one <stem>_seg.png)."""
    from ultrarefiner.data.datalist import image_datalist
    from ultrarefiner.engines.training.refiner_setup import inference_datalist

    images, coarse = tmp_path / "images", tmp_path / "coarse"
    for stem, suffix in (("a", ".png"), ("b", ".jpg"), ("c", ".BMP"), ("d", ".tif")):
        save(images / f"{stem}{suffix}", scan(len(stem)))
        save(coarse / f"{stem}_seg{'.png' if stem != 'd' else '.tiff'}", blob())
    (images / "notes.txt").write_text("not an image")
    assert [Path(e["image"]).name for e in image_datalist(images)] == ["a.png", "b.jpg", "c.BMP", "d.tif"]
    pairs = inference_datalist(images, coarse, "_seg")
    assert [(Path(e["image"]).stem, Path(e["coarse"]).name) for e in pairs] == [
        ("a", "a_seg.png"), ("b", "b_seg.png"), ("c", "c_seg.png"), ("d", "d_seg.tiff")]
    stacked = preprocessing("sam_refiner")(pairs[1])["image"]  # the JPEG and its mask, read by refine's rules
    assert np.array_equal(stacked[0].numpy() * 255, read_image(pairs[1]["image"]).astype(np.float32))
    save(coarse / "a_seg.jpg", blob())
    with pytest.raises(BadInputError, match="coarse mask of a.png ambiguous: a_seg.jpg, a_seg.png"):
        inference_datalist(images, coarse, "_seg")
    save(images / "a.jpg", scan(9))
    with pytest.raises(BadInputError, match="images a.jpg, a.png share a stem"):
        image_datalist(images)


def test_refine_predict_and_the_bundles_list_a_folder_alike(tmp_path):
    """One listing (``imaging.folder_image_files``) for ``refine``, ``predict`` and the bundles' inference: image
    suffixes in any case, sorted, not recursive, hidden files left out (predict read macOS's ``._a.png`` resource
    forks as images), and one error naming the folder when it is missing or holds no image."""
    from ultrarefiner.data.datalist import image_datalist
    from ultrarefiner.engines.inference.refine_folder import _match
    from ultrarefiner.engines.inference.ultra_predict import list_inputs

    images, masks = tmp_path / "images", tmp_path / "masks"
    for name in ("b.JPG", "a.png", "._a.png", ".hidden.png", "sub/c.png"):
        save(images / name, scan(3))
        save(masks / Path(name).with_suffix(".png"), blob())
    (images / "notes.txt").write_text("not an image")
    expected = ["a.png", "b.JPG"]
    assert [Path(e["image"]).name for e in image_datalist(images)] == expected
    assert [p.name for p in list_inputs(images)] == expected
    items, skipped = _match(images, masks, None)
    assert [Path(e["image"]).name for e in items] == expected and skipped == []
    (tmp_path / "empty").mkdir()
    for folder, problem in ((tmp_path / "empty", "no image files (.png"), (tmp_path / "nope", "not found")):
        for lister in (image_datalist, list_inputs, lambda f: _match(f, masks, None)):
            with pytest.raises(BadInputError, match=re.escape(problem)) as error:
                lister(folder)
            assert error.value.path == str(folder)



def test_exclude_patterns_leave_files_out_of_every_listing(tmp_path, caplog):
    """A BUSI class folder holds each image's masks beside it (``x.png``, ``x_mask.png``, ``x_mask_1.png``): the
    file-name patterns ``exclude`` (any case, a list or a comma-separated string as the CLI and ``monai.bundle run``
    pass them) leave them out of ``refine``'s, ``predict``'s and the bundles' listings, with a log line that counts
    them; a folder they empty, and a pattern that is a path, are errors."""
    import logging

    from ultrarefiner.data.datalist import image_datalist
    from ultrarefiner.engines.inference.refine_folder import _match
    from ultrarefiner.engines.inference.ultra_predict import input_datalist, list_inputs
    from ultrarefiner.engines.training.refiner_setup import inference_datalist
    from ultrarefiner.errors import BadOptionError

    folder, coarse = tmp_path / "benign", tmp_path / "coarse"
    for name in ("benign (1).png", "benign (1)_mask.png", "benign (2).PNG", "benign (2)_mask.png",
                 "benign (2)_mask_1.png"):
        save(folder / name, scan(len(name)))
    (folder / "notes.txt").write_text("not an image")
    for stem in ("benign (1)", "benign (2)"):
        save(coarse / f"{stem}.png", blob())
    everything = ["benign (1).png", "benign (1)_mask.png", "benign (2).PNG", "benign (2)_mask.png",
                  "benign (2)_mask_1.png"]
    assert [p.name for p in list_inputs(folder)] == everything  # inputs stay what the user gives
    with pytest.raises(BadInputError, match=re.escape("coarse mask of benign (1)_mask.png not found")):
        inference_datalist(folder, coarse)
    expected = ["benign (1).png", "benign (2).PNG"]
    with caplog.at_level(logging.INFO, logger="ultrarefiner.data.imaging"):
        for exclude in ("*_mask*", ["*_mask*"], " *_seg*, *_MASK* ", ("*_mask.png", "*_mask_?.png")):
            assert [p.name for p in list_inputs(folder, exclude)] == expected, exclude
    assert f"3 of 5 image files of {folder} left out by the exclude patterns *_mask*" in caplog.text
    assert [Path(e["image"]).name for e in image_datalist(folder, "*_mask*")] == expected
    assert [e["name"] for e in input_datalist(folder, "*_mask*")] == ["benign (1)", "benign (2)"]
    pairs = inference_datalist(folder, coarse, "", "*_mask*")
    assert [(Path(e["image"]).name, Path(e["coarse"]).name) for e in pairs] == [
        ("benign (1).png", "benign (1).png"), ("benign (2).PNG", "benign (2).png")]
    items, skipped = _match(folder, coarse, folder, "", "_mask", ("*_mask*",))
    assert [e["stem"] for e in items] == ["benign (1)", "benign (2)"] and skipped == []
    assert [Path(p).name for p in items[1]["label_parts"]] == ["benign (2)_mask_1.png"]  # still read as a label
    _, skipped = _match(folder, coarse, folder, "", "_mask")
    assert len(skipped) == 3 and all("no coarse mask named" in s["reason"] for s in skipped)
    for lister in (list_inputs, image_datalist, lambda f, e: _match(f, coarse, None, exclude=e)):
        with pytest.raises(BadInputError, match=re.escape("match every image file of the")) as error:
            lister(folder, "benign*")
        assert error.value.path == str(folder)
        with pytest.raises(BadOptionError, match="match file names, not paths"):
            lister(folder, "benign/*_mask*")


def test_files_named_like_masks_beside_their_images_are_warned_of(tmp_path, caplog):
    """Without --exclude, a BUSI class folder's masks are segmented (predict) or listed as images without a coarse
    mask (refine). They stay inputs, since a name is no proof, but one warning per folder names them and the
    patterns that would leave them out; a name like a mask without its image beside it is not one."""
    import logging

    from ultrarefiner.data.imaging import masks_beside_images
    from ultrarefiner.engines.inference.ultra_predict import list_inputs

    names = ["a.png", "a_mask.png", "a_mask_1.png", "b.png", "b_seg.PNG", "c_mask.png", "d.jpg", "d_gt.png",
             "e_masked.png"]
    for name in names:
        save(tmp_path / name, scan(len(name)))
    assert {w: [f.name for f in fs] for w, fs in masks_beside_images(sorted(tmp_path.iterdir())).items()} == {
        "mask": ["a_mask.png", "a_mask_1.png"], "seg": ["b_seg.PNG"], "gt": ["d_gt.png"]}
    with caplog.at_level(logging.WARNING, logger="ultrarefiner.data.imaging"):
        assert len(list_inputs(tmp_path)) == len(names)  # still inputs
        list_inputs(tmp_path)  # predict lists its input, then its bundle's datalist does: one warning
        kept = [p.name for p in list_inputs(tmp_path, "*_mask*,*_seg*,*_gt*")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"4 of the 9 image files of {tmp_path} are named like masks of the images beside them (e.g. "
                        f"a_mask.png, a_mask_1.png, b_seg.PNG, d_gt.png) and are read as images: pass --exclude "
                        f"'*_mask*,*_seg*,*_gt*' to leave them out"]
    assert kept == ["a.png", "b.png", "d.jpg"]  # c_mask.png and e_masked.png match *_mask* too: the user's call


@pytest.mark.parametrize("bundle", ["transunet", "sam_refiner", "ultrarefiner"])
def test_the_bundles_inference_takes_exclude(bundle, tmp_path):
    """``exclude`` is a config id of each bundle's inference.json (``--exclude '*_mask*'`` on ``monai.bundle run``):
    its datalist leaves those files out."""
    folder, coarse = tmp_path / "images", tmp_path / "coarse"
    for stem in ("a", "b"):
        save(folder / f"{stem}.png", scan(3))
        save(folder / f"{stem}_mask.png", blob())
        save(coarse / f"{stem}.png", blob())
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "inference.json"))
    assert parser["exclude"] == []
    parser["input_dir"], parser["coarse_dir"] = str(folder), str(coarse)
    if bundle == "sam_refiner":  # a mask taken for an image has no coarse mask
        with pytest.raises(RuntimeError) as error:  # MONAI wraps what the expression raised
            parser.get_parsed_content("datalist")
        assert "coarse mask of a_mask.png not found" in str(error.value.__cause__)
    else:
        names = sorted(Path(e["image"]).name for e in parser.get_parsed_content("datalist"))
        assert names == ["a.png", "a_mask.png", "b.png", "b_mask.png"]
    parser["exclude"] = "*_mask*"  # as monai.bundle run passes --exclude '*_mask*'
    parser.parse()
    assert sorted(Path(e["image"]).name for e in parser.get_parsed_content("datalist")) == ["a.png", "b.png"]

TRAINING_CHAINS = [
    ("transunet", ["train.json"], "train#preprocessing"),
    ("transunet", ["train.json"], "validate#preprocessing"),
    ("transunet", ["train.json", "evaluate.json"], "validate#preprocessing"),
    ("ultrarefiner", ["train.json"], "train#preprocessing"),
    ("ultrarefiner", ["train.json"], "validate#preprocessing"),
]


@pytest.mark.parametrize("bundle, configs, key", TRAINING_CHAINS)
def test_training_reads_images_and_labels_by_the_package_rules(images, bundle, configs, key):
    """The training and evaluation chains read a MONAI Label datastore's raw files as ``preprocess`` reads them.

    ``write_training_datalist`` points the bundles at the datastore's own files. MONAI's raw ``PILReader`` gave a
    colour image 3 channels (TransUNet's 1-channel input refused it), a 16-bit image values up to 65535 (the SAM
    image of phase 3, 0-255, went white) and an RGBA label drawn in its alpha channel one white plane (all lesion).
    """
    from monai.transforms import Randomizable

    gray, files = images
    tmp = files["gray"].parent
    lesion = blob(48, 64) > 0
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 255, lesion * 255  # a white drawing on a transparent background
    labels = {"0/255": save(tmp / "lab.png", lesion.astype(np.uint8) * 255),
              "0/1": save(tmp / "lab01.png", lesion.astype(np.uint8)),
              "alpha": save(tmp / "rgba.png", rgba),
              "16-bit": save(tmp / "lab16.png", lesion.astype(np.uint16) * 65535)}
    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / bundle / "configs" / c) for c in configs])
    parser.update({"img_size": 32, "sam_model_type": "tiny", "sam_checkpoint": "", "network_def#transunet#vit_depth": 1,
                   "device": "$torch.device('cpu')"} if bundle == "ultrarefiner" else {"img_size": 32})
    chain = parser.get_parsed_content(key)
    end = chain.get_index_of_first(lambda t: isinstance(t, Randomizable))  # the cached, deterministic part
    reference = chain({"image": str(files["gray"]), "label": str(labels["0/255"])}, end=end)
    assert tuple(reference["image"].shape) == (1, 32, 32) and reference["label"].sum() > 0
    for name, image in files.items():
        for storage, label in labels.items():
            out = chain({"image": str(image), "label": str(label)}, end=end)
            assert sorted(out) == sorted(reference)
            for k, v in out.items():
                if isinstance(v, torch.Tensor):
                    assert v.shape == reference[k].shape and torch.equal(v, reference[k]), (name, storage, k)


@pytest.mark.parametrize("bundle, config, key, role", [
    ("transunet", "train.json", "train#preprocessing", "label"),
    ("transunet", "train.json", "train#preprocessing", "image"),
    ("sam_refiner", "inference.json", "preprocessing", "coarse"),
    ("sam_refiner", "inference.json", "preprocessing", "image"),
])
def test_files_the_rules_refuse_stop_the_chain_naming_them(tmp_path, bundle, config, key, role):
    """A file the package's rules refuse is a ``BadInputError`` naming it. MONAI's ``LoadImaged`` tries the other
    readers when the one given to its constructor fails: a mask of logits was read raw by ``PILReader`` (values
    below 0, transposed), a garbage image ended in "cannot find a suitable reader"."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / config))
    parser.update({"img_size": 32})
    chain = parser.get_parsed_content(key)
    item = {"image": str(save(tmp_path / "scan.png", scan(1, 20, 30))),
            ("label" if bundle == "transunet" else "coarse"): str(save(tmp_path / "mask.png", blob(20, 30)))}
    if role == "image":
        bad, problem = tmp_path / "garbage.png", "unreadable image"
        bad.write_bytes(b"not a png at all")
    else:
        logits = np.where(blob(20, 30) > 0, 4.0, -4.0).astype(np.float32)
        bad, problem = tmp_path / "logits.tif", "negative values"
        Image.fromarray(logits).save(bad)
    item[role] = str(bad)
    with pytest.raises(RuntimeError) as error:  # MONAI's Compose wraps it: "applying transform ..."
        chain(item)
    cause = error.value
    while cause is not None and not isinstance(cause, BadInputError):
        cause = cause.__cause__ or cause.__context__
    assert cause is not None and cause.path == str(bad) and problem in cause.reason
