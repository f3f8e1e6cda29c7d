"""ONNX export (``ultrarefiner.export.onnx``, ``python -m ultrarefiner export-onnx``): onnxruntime on CPU against
PyTorch within 1e-3 for TransUNet, the refiner's image encoder and its decoder path, at another batch size than the
export's (the batch axis is dynamic).

TransUNet is the real class at a tiny size; the refiner is LiteMedSAM with its packaged weights (the default) and a
tiny segment-anything ``Sam`` of vit_b's classes (windowed ViT with a global block, MedSAM preprocessing), with
point prompts and three candidates to cover the other decoder inputs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ultrarefiner.data.synthetic import make_phantom
from ultrarefiner.export.onnx import (
    DECODER_FILE,
    ENCODER_FILE,
    RefinerDecoder,
    decoder_inputs,
    export_onnx,
    export_refiner_onnx,
    export_transunet_onnx,
    report_file,
)
from ultrarefiner.networks import SAMRefiner, TransUNet, build_tiny_sam

TOL = 1e-3
TINY_TU = {"img_size": 32, "vit_depth": 1, "hidden_size": 32, "num_heads": 2, "mlp_dim": 64, "block_units": (1, 1, 1),
           "decoder_channels": (32, 16, 16, 8)}


def run_onnx(path, feed: dict[str, torch.Tensor]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feed.items()})


def phantoms(n: int, size=(96, 128), seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,1,H,W) phantom images on the 0-255 scale and blurred (soft) coarse masks of their lesions."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    images, masks = [], []
    for i in range(n):
        image, lesions = make_phantom(rng, "malignant" if i % 2 else "benign", size)
        images.append(image.astype(np.float32))
        masks.append(ndimage.gaussian_filter(lesions[0].astype(np.float32), 3.0))
    return torch.from_numpy(np.stack(images))[:, None], torch.from_numpy(np.stack(masks))[:, None]


def check_refiner(refiner: SAMRefiner, out_dir) -> None:
    """Encoder and decoder graphs against PyTorch at batch 3, then both graphs chained against the refiner's own
    forward (eval: the selected candidate's logits at the image size)."""
    image, coarse = phantoms(3)
    size = tuple(image.shape[-2:])
    encoder_input = refiner.preprocess_image(image).float()
    with torch.no_grad():
        embeddings = refiner.sam.image_encoder(encoder_input)
    (got_emb,) = run_onnx(out_dir / ENCODER_FILE, {"encoder_input": encoder_input})
    assert got_emb.shape == tuple(embeddings.shape)
    assert np.abs(got_emb - embeddings.numpy()).max() < TOL

    prompts = decoder_inputs(refiner, coarse, size)
    names = RefinerDecoder(refiner).prompt_names
    assert list(prompts) == list(names)
    with torch.no_grad():
        ref_low, ref_iou = refiner.decode(embeddings, refiner.make_prompts(coarse, size), size)
    low, iou = run_onnx(out_dir / DECODER_FILE, {"image_embeddings": embeddings, **prompts})
    assert low.shape == tuple(ref_low.shape) and iou.shape == tuple(ref_iou.shape)
    assert np.abs(low - ref_low.numpy()).max() < TOL and np.abs(iou - ref_iou.numpy()).max() < TOL

    # deployment path: ONNX encoder -> ONNX decoder -> postprocess, as SAMRefiner.forward in eval mode
    low, iou = run_onnx(out_dir / DECODER_FILE, {"image_embeddings": torch.from_numpy(got_emb), **prompts})
    best = torch.from_numpy(iou).argmax(dim=1)
    selected = torch.from_numpy(low)[torch.arange(len(best)), best][:, None]
    masks = refiner.geometry.postprocess_masks(selected, size)
    with torch.no_grad():
        ref = refiner(image=image, coarse=coarse)["masks"]
    assert masks.shape == ref.shape == (3, 1, *size)
    assert (masks - ref).abs().max() < TOL


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    refiner = SAMRefiner().eval()  # LiteMedSAM, packaged weights, box + mask prompt, single mask
    out = tmp_path_factory.mktemp("lite")
    report = export_refiner_onnx(refiner, out, batch_size=2)
    return refiner, out, report


def test_transunet(tmp_path):
    torch.manual_seed(0)
    net = TransUNet(**TINY_TU).eval()
    report = export_transunet_onnx(net, tmp_path, batch_size=2)
    assert report["verification"]["max_abs_diff"] < TOL
    image = torch.rand(3, 1, 32, 32)
    (got,) = run_onnx(tmp_path / "transunet.onnx", {"image": image})
    with torch.no_grad():
        ref = net(image).numpy()
    assert got.shape == ref.shape == (3, 2, 32, 32)
    assert np.abs(got - ref).max() < TOL


def test_a_failed_export_keeps_the_previous_file(tmp_path, monkeypatch):
    """The .onnx is written to a temporary file, checked, then renamed: an export that dies half-way (or yields a
    fixed-batch graph) leaves the previous export whole and no temporary file."""
    import monai.networks.utils

    torch.manual_seed(0)
    net = TransUNet(**TINY_TU).eval()
    export_transunet_onnx(net, tmp_path, batch_size=2, verify=False)
    before = (tmp_path / "transunet.onnx").read_bytes()

    def dies_half_way(*args, filename, **kwargs):
        with open(filename, "wb") as f:
            f.write(before[: len(before) // 2])
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(monai.networks.utils, "convert_to_onnx", dies_half_way)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export_transunet_onnx(net, tmp_path, batch_size=2, verify=False)
    assert (tmp_path / "transunet.onnx").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transunet.onnx"]


def test_lite_medsam_refiner(lite):
    refiner, out, report = lite
    assert report["preprocessing"] == "litemedsam"
    assert report["encoder"]["inputs"] == {"encoder_input": ["batch", 3, 256, 256]}
    assert list(report["decoder"]["inputs"]) == ["image_embeddings", "boxes", "mask_input"]
    assert report["decoder"]["outputs"]["low_res_logits"] == ["batch", 1, 256, 256]
    for graph in ("encoder", "decoder"):
        assert report[graph]["verification"]["max_abs_diff"] < TOL
    check_refiner(refiner, out)


def test_vit_b_classes_with_points_and_three_candidates(tmp_path):
    sam = build_tiny_sam(img_size=128, encoder_depth=2, window_size=4)
    refiner = SAMRefiner(sam, checkpoint=None, preprocessing="medsam", use_point_prompt=True,
                         use_negative_point=True, multimask_output=True).eval()
    report = export_refiner_onnx(refiner, tmp_path, batch_size=2)
    assert list(report["decoder"]["inputs"]) == ["image_embeddings", "boxes", "point_coords", "point_labels",
                                                 "mask_input"]
    assert report["decoder"]["outputs"]["iou_predictions"] == ["batch", 3]
    check_refiner(refiner, tmp_path)


def test_command(tmp_path):
    """``export-onnx --kind transunet`` from a transunet bundle checkpoint (network settings read from it)."""
    torch.manual_seed(1)
    ckpt = tmp_path / "best.pt"
    torch.save({"model": TransUNet(**TINY_TU).state_dict(), "epoch": 1, "metric": 0.5, "metric_name": "val_mean_dice",
                "network_kwargs": TINY_TU}, ckpt)
    out = tmp_path / "onnx"
    res = subprocess.run([sys.executable, "-m", "ultrarefiner", "export-onnx", "--kind", "transunet",
                          "--checkpoint", str(ckpt), "--output_dir", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "max abs diff" in res.stdout
    report = json.loads((out / report_file("transunet")).read_text())
    assert report["kind"] == "transunet" and report["transunet"]["verification"]["max_abs_diff"] < TOL
    assert (out / "transunet.onnx").is_file()

    bad = subprocess.run([sys.executable, "-m", "ultrarefiner", "export-onnx", "--kind", "unet",
                          "--output_dir", str(out)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--kind must be transunet or refiner" in bad.stderr


def test_unknown_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        export_onnx("unet", TransUNet(**TINY_TU), tmp_path)
