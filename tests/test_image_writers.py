"""``data.image_writers``: the MONAI writers of every bundle's inference write each file atomically. A write that
fails half-way leaves the previous file whole and no temporary file; every ``SaveImaged`` of the three bundles'
inference configs (NIfTI ones included) uses them."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import SaveImaged
from PIL import Image

from ultrarefiner.data.image_writers import AtomicNibabelWriter, AtomicPILWriter

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def test_a_write_failing_half_way_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "out" / "a_seg.png"
    target.parent.mkdir()
    Image.fromarray(np.full((4, 6), 255, np.uint8)).save(target)
    before = target.read_bytes()

    def half_then_full_disk(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", half_then_full_disk)
    saver = SaveImaged("pred", output_dir=str(tmp_path / "out"), output_ext=".png", output_postfix="seg",
                       separate_folder=False, resample=False, print_log=False, output_dtype=np.uint8, scale=255,
                       writer=AtomicPILWriter).set_options(write_kwargs={"reverse_indexing": False})
    from monai.data import MetaTensor

    pred = MetaTensor(torch.zeros(1, 4, 6), meta={"filename_or_obj": "a.png"})
    with pytest.raises(RuntimeError, match="a_seg.png"):  # SaveImaged wraps the writer's error, naming the file
        saver({"pred": pred})
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["a_seg.png"]


@pytest.mark.parametrize("bundle", ["transunet", "sam_refiner", "ultrarefiner"])
def test_every_inference_writer_is_atomic(bundle):
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(BUNDLES / bundle), "nifti": True})
    if bundle == "ultrarefiner":
        parser["writes#round_size"] = 3  # set from the predictor's batch size, which would build the network
    savers = [t for t in parser.get_parsed_content("postprocessing").transforms if isinstance(t, SaveImaged)]
    assert savers
    for saver in savers:
        (writer,) = saver.saver.writers
        cls = writer.func if isinstance(writer, functools.partial) else writer
        assert cls in (AtomicPILWriter, AtomicNibabelWriter), (bundle, saver.keys, writer)
