"""bundles/transunet: train, resume after a kill, evaluate, inference, multi-GPU (gloo on CPU), verify, export.

Tiny settings (32x32 input, one ViT block, 2 iterations) on the real configs and code paths.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from bundle_utils import (
    REPO,
    assert_best_is_reported,
    assert_ok,
    bundle_argv,
    bundle_cmd,
    kill_when_written,
    phantom_overrides,
    preprocessed_phantoms,
    verify_metadata,
)

TRAIN = ["train.json"]
TINY = {"img_size": 32, "vit_depth": 1, "batch_size": 2, "num_workers": 0, "cache": "none", "epoch_length": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return preprocessed_phantoms(tmp_path_factory.mktemp("tu"))


def overrides(data: Path, **extra) -> dict:
    return phantom_overrides(data, TINY, **extra)


@pytest.fixture(scope="module")
def trained(data):
    res = bundle_cmd("run", "transunet", TRAIN, overrides(data, epochs=2))
    assert_ok(res)
    return data, res


def test_train_writes_checkpoints_and_report(trained):
    data, res = trained
    fold = data / "ckpt" / "transunet" / "BUSI" / "fold_0"
    best = torch.load(fold / "best.pt", weights_only=True)
    last = torch.load(fold / "last.pt", weights_only=False)
    assert best["network_kwargs"]["img_size"] == 32
    assert last["epoch"] == 2 and "optimizer" in last and "lr_scheduler" in last
    assert_best_is_reported(best, last, res.stdout + res.stderr)
    assert (data / "models" / "model.pt").is_file()
    assert any((fold / "tensorboard").iterdir())
    out = res.stdout + res.stderr
    assert "[TRAIN]" in out and "[VALIDATION]" in out


def test_resume_after_kill(data):
    ov = overrides(data, epochs=400, ckpt_root=str(data / "ckpt_kill"), model_path=str(data / "kill_model.pt"))
    cmd = bundle_argv("run", "transunet", TRAIN, ov)
    last = data / "ckpt_kill" / "transunet" / "BUSI" / "fold_0" / "last.pt"
    kill_when_written(cmd, last, settle=2)
    epoch_at_kill = torch.load(last, weights_only=False)["epoch"]  # the kill never leaves a half-written file
    assert 1 <= epoch_at_kill < 400
    res = bundle_cmd("run", "transunet", TRAIN, {**ov, "epochs": epoch_at_kill + 1})
    assert_ok(res)
    assert "resumed from" in res.stdout + res.stderr
    assert not list(last.parent.glob(".*.tmp"))  # a temporary left by the kill is removed on restart
    resumed = torch.load(last, weights_only=False)
    assert resumed["epoch"] == epoch_at_kill + 1
    # the poly schedule follows the restarted run's epochs (2 iterations each), not the killed run's 400
    assert resumed["lr_scheduler"]["total_iters"] == (epoch_at_kill + 1) * 2


def test_evaluate_native_resolution(trained):
    data, _ = trained
    res = bundle_cmd("run", "transunet", ["train.json", "evaluate.json"], overrides(data))
    assert_ok(res)
    ev = data / "ckpt" / "transunet" / "BUSI" / "fold_0" / "eval_test"
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["n_images"] == len(
        json.loads((data / "processed" / "BUSI" / "datalist.json").read_text())["testing"]
    )
    for k in ("dice", "iou", "precision", "recall", "accuracy", "hd95"):
        assert k in summary["metrics"]
    rows = (ev / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("image,height,width") and len(rows) == summary["n_images"] + 1
    assert ",96,128," in rows[1]  # native size, not 32x32
    assert list((ev / "overlays").glob("*.png"))

    # another split goes to its own folder: the test split's report is left as it was
    test_summary = (ev / "summary.json").read_bytes()
    assert_ok(bundle_cmd("run", "transunet", ["train.json", "evaluate.json"], overrides(data, eval_split="val")))
    from ultrarefiner.data.datalist import load_split

    val = json.loads((ev.parent / "eval_val" / "summary.json").read_text())
    assert val["n_images"] == len(load_split(data / "processed" / "BUSI" / "datalist.json", 0, "val"))
    assert (ev / "summary.json").read_bytes() == test_summary


def test_inference(trained, tmp_path):
    data, _ = trained
    res = bundle_cmd(
        "run",
        "transunet",
        ["inference.json"],
        {
            "input_dir": str(data / "processed" / "BUSI" / "images"),
            "output_dir": str(tmp_path / "pred"),
            "ckpt_path": str(data / "models" / "model.pt"),
            "img_size": 32,
            "vit_depth": 1,
        },
    )
    assert_ok(res)
    from PIL import Image

    outs = sorted((tmp_path / "pred").rglob("*.png"))
    assert len(outs) == len(list((data / "processed" / "BUSI" / "images").glob("*.png")))
    src = Image.open(data / "processed" / "BUSI" / "images" / outs[0].name.replace("_seg", ""))
    assert Image.open(outs[0]).size == src.size


def test_multi_gpu_config_with_gloo(data):
    ov = overrides(data, epochs=1, ckpt_root=str(data / "ckpt_ddp"), model_path=str(data / "ddp_model.pt"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "monai.bundle"]
    res = bundle_cmd("run", "transunet", ["train.json", "multi_gpu_train.json"], ov, timeout=600, python=torchrun)
    assert_ok(res)
    assert (data / "ckpt_ddp" / "transunet" / "BUSI" / "fold_0" / "last.pt").is_file()


def test_verify_metadata_net_in_out_and_export(trained, tmp_path):
    data, _ = trained
    assert_ok(verify_metadata("transunet"))
    small = {"img_size": 32, "vit_depth": 1}
    meta = tmp_path / "metadata.json"
    m = json.loads((REPO / "bundles" / "transunet" / "configs" / "metadata.json").read_text())
    for io in ("inputs", "outputs"):
        for v in m["network_data_format"][io].values():
            v["spatial_shape"] = [32, 32]
    meta.write_text(json.dumps(m))
    res = bundle_cmd(
        "verify_net_in_out", "transunet", ["inference.json"], {"net_id": "network_def", **small, "meta_file": str(meta)}
    )
    assert_ok(res)
    ts = tmp_path / "model.ts"
    res = bundle_cmd(
        "ckpt_export",
        "transunet",
        ["inference.json"],
        {
            "net_id": "network_def",
            "filepath": str(ts),
            "ckpt_file": str(data / "models" / "model.pt"),
            "key_in_ckpt": "model",  # the exported file describes itself: its weights are under "model"
            "use_trace": True,
            "meta_file": str(meta),
            **small,
        },
    )
    assert_ok(res)
    scripted = torch.jit.load(str(ts))
    x = torch.rand(1, 1, 32, 32)
    from ultrarefiner.hub import create_model

    ref = create_model("transunet", data / "ckpt" / "transunet" / "BUSI" / "fold_0" / "best.pt")
    assert torch.allclose(scripted(x), ref(x), atol=1e-4)
