"""The shipped BUSI refiner (bundles/sam_refiner/models/model.pt): the file large_files.yml describes, small enough
for the Model Zoo, loadable onto the packaged LiteMedSAM encoder, and better than the coarse mask it is given."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import yaml

from ultrarefiner.engines.checkpoints.refiner_checkpoint import load_refiner_checkpoint, read_refiner_checkpoint
from ultrarefiner.networks import SAMRefiner

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "sam_refiner"
MODEL = BUNDLE / "models" / "model.pt"


def test_shipped_file_matches_large_files_yml_and_size_limit():
    entry = next(e for e in yaml.safe_load((BUNDLE / "large_files.yml").read_text())["large_files"]
                 if e["path"] == "models/model.pt")
    assert entry["hash_type"] == "sha256"
    assert hashlib.sha256(MODEL.read_bytes()).hexdigest() == entry["hash_val"]
    assert MODEL.stat().st_size <= 25 * 1024 * 1024


def test_shipped_refiner_is_decoder_only_and_refines():
    obj = read_refiner_checkpoint(MODEL)
    assert obj["partial"] and not obj["lora"]
    assert all(k.startswith(("sam.prompt_encoder.", "sam.mask_decoder.")) for k in obj["model"])
    refiner = SAMRefiner().eval()  # LiteMedSAM, packaged weights
    before = {k: v.clone() for k, v in refiner.state_dict().items() if k.startswith("sam.mask_decoder.")}
    load_refiner_checkpoint(refiner, MODEL)  # the encoder fingerprint must match the packaged weights
    assert any(not torch.equal(before[k], v) for k, v in refiner.state_dict().items() if k in before)

    # a bright elliptical "lesion" on speckle; the coarse mask is a shifted, shrunken ellipse
    rng = np.random.default_rng(0)
    h, w = 180, 240
    yy, xx = np.mgrid[:h, :w]
    truth = ((xx - 120) / 50.0) ** 2 + ((yy - 90) / 35.0) ** 2 < 1
    image = np.clip(60 + 40 * rng.standard_normal((h, w)) - 45 * truth, 0, 255).astype(np.float32)
    coarse = (((xx - 132) / 38.0) ** 2 + ((yy - 84) / 26.0) ** 2 < 1).astype(np.float32)
    with torch.no_grad():
        out = refiner(image=torch.from_numpy(image)[None, None], coarse=torch.from_numpy(coarse)[None, None])
    refined = out["masks"][0, 0].numpy() > 0

    def dice(a, b):
        return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())

    assert dice(refined, truth) > dice(coarse > 0.5, truth) + 0.05
