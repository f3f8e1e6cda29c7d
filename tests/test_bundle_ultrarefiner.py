"""bundles/ultrarefiner: initialisation from phase-1/phase-2 checkpoints (full and LoRA), missing-checkpoint message,
train, resume after a kill (--from_scratch), evaluate (coarse vs refined, paired comparison, iterations and gate),
inference, multi-GPU (gloo on CPU), verify_metadata / verify_net_in_out / TorchScript export.

Tiny networks (TransUNet 32x32 with one narrow ViT block, a 256-pixel SAM) on the real configs and code paths; the
phase-1/phase-2 checkpoints are written by the test in the formats the other bundles document.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bundle_utils import (
    REPO,
    SCHEMA,
    assert_best_is_reported,
    assert_ok,
    bundle_argv,
    bundle_cmd,
    kill_when_written,
    phantom_overrides,
    preprocessed_phantoms,
)

BUNDLE = REPO / "bundles" / "ultrarefiner"
TRAIN = ["train.json"]
TU = {"img_size": 32, "num_classes": 2, "in_channels": 1, "variant": "R50-ViT-B_16", "vit_depth": 1, "hidden_size": 32,
      "num_heads": 2, "mlp_dim": 64, "block_units": [1, 1, 1], "decoder_channels": [32, 16, 16, 8]}
SAM = {"model_type": "tiny", "img_size": 256}
# the tiny networks through the network_def components' arguments (what the checkpoints record is read back from them)
NET = {"img_size": 32, **{f"network_def#transunet#{k}": v for k, v in TU.items()}, "sam_model_type": "tiny",
       **{f"sam_def#{k}": v for k, v in SAM.items() if k != "model_type"}}
# the tiny SAM has no packaged weights: its base weights are its own (seeded) random init
TINY = {**NET, "sam_checkpoint": "", "batch_size": 2, "num_workers": 0, "cache": "none", "epoch_length": 2}


def write_phase1(ckpt_root: Path, dataset: str = "BUSI", fold: int = 0, identity: dict | None = None) -> Path:
    """TransUNet best.pt as the transunet bundle writes it ({"model", "network_kwargs", ...}); ``identity``: the
    run it records (none: a file of an older version)."""
    from ultrarefiner.networks import TransUNet

    torch.manual_seed(1)
    path = ckpt_root / "transunet" / dataset / f"fold_{fold}" / "best.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": TransUNet(**TU).state_dict(), "epoch": 3, "metric": 0.5, "metric_name": "val_mean_dice",
                "network_kwargs": TU, **({"identity": identity} if identity else {})}, path)
    return path


def write_phase2(ckpt_root: Path, fold: int = 0, full: bool = False, dataset: str = "BUSI",
                 identity: dict | None = None) -> Path:
    """Refiner best.pt as the sam_refiner bundle writes it: with the frozen encoder (default) only the prompt encoder
    and mask decoder (``{"model", "lora": False, "partial": True, "encoder"}``) over the base weights (the config's
    tiny SAM, seed 0); ``full``: every weight, as with a trained encoder (another encoder here, seed 2)."""
    from ultrarefiner.engines.checkpoints.refiner_checkpoint import encoder_record, refiner_state_dict
    from ultrarefiner.networks import SAMRefiner, build_tiny_sam

    refiner = SAMRefiner(build_tiny_sam(img_size=256, seed=2 if full else 0), freeze_image_encoder=not full)
    with torch.no_grad():  # a "trained" decoder: different from the base weights
        for p in refiner.sam.mask_decoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = ckpt_root / "sam_refiner" / dataset / f"fold_{fold}" / "best.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": refiner_state_dict(refiner), "lora": False, **encoder_record(refiner), "epoch": 3,
                "metric": 0.6, **({"identity": identity} if identity else {})}, path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = preprocessed_phantoms(tmp_path_factory.mktemp("ur"), n_benign=4, n_malignant=3)
    write_phase1(tmp / "ckpt")
    write_phase2(tmp / "ckpt")
    return tmp


def overrides(data: Path, **extra) -> dict:
    return phantom_overrides(data, TINY, **extra)


@pytest.fixture(scope="module")
def trained(data):
    res = bundle_cmd("run", "ultrarefiner", TRAIN, overrides(data, epochs=1))
    assert_ok(res)
    return data, res


def test_train_initialises_from_phase_checkpoints(trained):
    data, res = trained
    fold = data / "ckpt" / "ultrarefiner" / "BUSI" / "fold_0"
    best = torch.load(fold / "best.pt", weights_only=True)
    last = torch.load(fold / "last.pt", weights_only=False)
    recorded = best["network_kwargs"]  # every build argument, read from the built networks
    assert TU.items() <= recorded["transunet"].items() and SAM.items() <= recorded["sam"].items()
    assert_best_is_reported(best, last, res.stdout + res.stderr)
    for obj in (best, last):  # the run they belong to
        assert {k: obj["identity"][k] for k in ("phase", "dataset", "fold")} == {
            "phase": "ultrarefiner", "dataset": "BUSI", "fold": 0}
        assert obj["identity"]["fingerprint"] and obj["settings"]["epochs"] == 1
    assert last["epoch"] == 1 and [g["name"] for g in last["optimizer"]["param_groups"]] == ["transunet", "sam"]
    groups = last["optimizer"]["param_groups"]  # both peak rates, warmed up and decayed to 0 by the run's end
    assert [g["initial_lr"] for g in groups] == [1e-4, 1e-5] and last["lr_scheduler"]["t_total"] == 2
    assert [g["lr"] for g in groups] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert (data / "models" / "model.pt").is_file()
    # started from the phase-1/phase-2 weights: TransUNet moved a little, the frozen SAM encoder not at all
    phase1 = torch.load(data / "ckpt" / "transunet" / "BUSI" / "fold_0" / "best.pt", weights_only=True)["model"]
    phase2 = torch.load(data / "ckpt" / "sam_refiner" / "BUSI" / "fold_0" / "best.pt", weights_only=True)["model"]
    model = last["model"]
    drift = max(float((model[f"transunet.{k}"].float() - v.float()).abs().max()) for k, v in phase1.items()
                if "running_" not in k and "num_batches" not in k)  # BatchNorm statistics move by themselves
    assert 0.0 < drift < 0.05
    assert phase2 and all(k.startswith(("sam.prompt_encoder.", "sam.mask_decoder.")) for k in phase2)  # partial
    dec = [k for k in phase2 if k.startswith("sam.mask_decoder.")]
    assert max(float((model[f"refiner.{k}"] - phase2[k]).abs().max()) for k in dec) < 1e-3  # phase 2's decoder
    from ultrarefiner.networks import build_tiny_sam

    base = build_tiny_sam(img_size=256).state_dict()  # the base encoder the decoder was trained on, not moved
    assert all(torch.equal(model[f"refiner.sam.{k}"], v) for k, v in base.items() if k.startswith("image_encoder."))
    out = res.stdout + res.stderr
    assert "[TRAIN]" in out and "[VALIDATION]" in out and "Coarse Dice" in out and "HD95" in out
    summary = json.loads((fold / "val_report" / "summary.json").read_text())
    assert "refined_vs_coarse" in summary["comparisons"]["all"]


def test_missing_checkpoints_name_files_and_suggest_from_scratch(tmp_path):
    from monai.bundle import ConfigParser

    from ultrarefiner.engines.training.initialisation import MissingCheckpointError

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    for k, v in {"ckpt_root": str(tmp_path / "none"), "device": "$torch.device('cpu')", **NET,
                 "sam_checkpoint": ""}.items():
        parser[k] = v
    with pytest.raises(RuntimeError) as e:  # the config parser wraps what the expression raised
        parser.get_parsed_content("network")
    assert isinstance(e.value.__cause__, MissingCheckpointError)
    msg = str(e.value.__cause__)
    assert str(tmp_path / "none" / "transunet" / "BUSI" / "fold_0" / "best.pt") in msg
    assert str(tmp_path / "none" / "sam_refiner" / "BUSI" / "fold_0" / "best.pt") in msg
    assert "--from_scratch True" in msg and "--transunet_ckpt" in msg and "--refiner_ckpt" in msg
    # overridable ids, and a TransUNet checkpoint of another architecture is refused with the option to fix
    refiner = write_phase2(tmp_path)
    other = tmp_path / "other.pt"
    torch.save({"model": {}, "network_kwargs": {**TU, "vit_depth": 2}}, other)
    parser["transunet_ckpt"], parser["refiner_ckpt"] = str(other), str(refiner)
    with pytest.raises(RuntimeError) as e:
        parser.get_parsed_content("network", lazy=False)
    assert "vit_depth=2 (config: 1)" in str(e.value.__cause__)


def test_full_and_partial_refiner_checkpoints(tmp_path):
    """Phase 3 takes a partial phase-2 checkpoint over the base encoder it was trained on (refusing another encoder)
    and a full one (trained encoder) with every weight."""
    from ultrarefiner.engines.training.e2e_setup import build_ultrarefiner
    from ultrarefiner.engines.training.initialisation import init_from_phase_checkpoints
    from ultrarefiner.errors import BadInputError
    from ultrarefiner.networks import build_tiny_sam

    tu = write_phase1(tmp_path)
    nk = {"transunet": TU, "sam": SAM, "refiner": {}}
    partial = write_phase2(tmp_path)
    phase2 = torch.load(partial, weights_only=True)["model"]
    net = init_from_phase_checkpoints(build_ultrarefiner(nk), tu, partial, transunet_kwargs=TU)
    sd = net.refiner.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in phase2.items())
    base = build_tiny_sam(img_size=256).state_dict()
    assert all(torch.equal(sd[f"sam.{k}"], v) for k, v in base.items() if k.startswith("image_encoder."))
    other = build_ultrarefiner({**nk, "sam": {**SAM, "seed": 5}})  # another base encoder
    with pytest.raises(BadInputError, match="another image encoder"):
        init_from_phase_checkpoints(other, tu, partial, transunet_kwargs=TU)
    full = write_phase2(tmp_path / "full", full=True)
    phase2 = torch.load(full, weights_only=True)["model"]
    assert any(k.startswith("sam.image_encoder.") for k in phase2)
    sd = init_from_phase_checkpoints(build_ultrarefiner(nk), tu, full, transunet_kwargs=TU).refiner.state_dict()
    assert sd.keys() == phase2.keys() and all(torch.equal(sd[k], v) for k, v in phase2.items())


def test_phase_checkpoints_of_another_run_are_refused(tmp_path, caplog):
    """Phase 3 of BUSI fold 0 takes phase-1/phase-2 files of BUSI fold 0, or files without a recorded run; another
    fold's model (trained on this fold's validation images) or phase is refused, naming the file and both; another
    dataset's file is a transfer, used with a warning."""
    from ultrarefiner.engines.checkpoints.checkpoint import run_identity
    from ultrarefiner.engines.training.e2e_setup import build_ultrarefiner
    from ultrarefiner.engines.training.initialisation import init_from_phase_checkpoints
    from ultrarefiner.errors import CheckpointMismatchError

    nk = {"transunet": TU, "sam": SAM, "refiner": {}}
    run = {"transunet_kwargs": TU, "dataset": "BUSI", "fold": 0}
    tu = write_phase1(tmp_path / "ok", identity=run_identity("transunet", "BUSI", 0, TU))
    refiner = write_phase2(tmp_path / "ok", identity=run_identity("sam_refiner", "BUSI", 0, {"model_type": "tiny"}))
    init_from_phase_checkpoints(build_ultrarefiner(nk), tu, refiner, **run)
    init_from_phase_checkpoints(build_ultrarefiner(nk), write_phase1(tmp_path / "old"), write_phase2(tmp_path / "old"),
                                **run)

    other_fold = write_phase1(tmp_path / "fold1", fold=1, identity=run_identity("transunet", "BUSI", 1, TU))
    with pytest.raises(CheckpointMismatchError) as e:
        init_from_phase_checkpoints(build_ultrarefiner(nk), other_fold, refiner, **run)
    msg = str(e.value)
    assert str(other_fold) in msg and "fold differs" in msg and "--transunet_ckpt" in msg
    assert "the file holds phase 'transunet', dataset 'BUSI', fold 1" in msg
    assert "this run is phase 'transunet', dataset 'BUSI', fold 0" in msg
    other_dataset = write_phase2(tmp_path / "busbra", dataset="BUSBRA",
                                 identity=run_identity("sam_refiner", "BUSBRA", 0, {"model_type": "tiny"}))
    with caplog.at_level(logging.WARNING):
        init_from_phase_checkpoints(build_ultrarefiner(nk), tu, other_dataset, **run)
    assert "trained on dataset 'BUSBRA'" in caplog.text and "transfer" in caplog.text
    with pytest.raises(CheckpointMismatchError, match="phase differs"):  # the options swapped round
        init_from_phase_checkpoints(build_ultrarefiner(nk), refiner, tu, **run)


def test_lora_refiner_checkpoint_is_merged_into_a_frozen_cached_encoder(tmp_path):
    from ultrarefiner.engines.training.e2e_setup import build_ultrarefiner
    from ultrarefiner.engines.training.initialisation import init_from_phase_checkpoints
    from ultrarefiner.errors import BadInputError
    from ultrarefiner.networks import SAMRefiner, build_tiny_sam, lora_state_dict
    from ultrarefiner.networks.lora import has_lora

    base = build_tiny_sam(img_size=256, seed=3)
    torch.save(base.state_dict(), tmp_path / "medsam_base.pth")
    lora = SAMRefiner(build_tiny_sam(img_size=256, seed=3), use_lora=True, lora_rank=2, lora_alpha=4.0)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    torch.save({"model": lora_state_dict(lora), "lora": True}, tmp_path / "refiner.pt")
    write_phase1(tmp_path)
    tu = tmp_path / "transunet" / "BUSI" / "fold_0" / "best.pt"
    nk = {"transunet": TU, "sam": SAM, "refiner": {}}
    with pytest.raises(BadInputError, match="--sam_checkpoint"):
        init_from_phase_checkpoints(build_ultrarefiner(nk), tu, tmp_path / "refiner.pt", transunet_kwargs=TU)
    net = init_from_phase_checkpoints(build_ultrarefiner(nk, sam_checkpoint=tmp_path / "medsam_base.pth"), tu,
                                      tmp_path / "refiner.pt", sam_checkpoint=tmp_path / "medsam_base.pth",
                                      transunet_kwargs=TU)
    assert not has_lora(net) and net.cache_embeddings
    assert not any(p.requires_grad for p in net.refiner.sam.image_encoder.parameters())
    image = torch.rand(1, 1, 48, 64) * 255
    with torch.no_grad():
        merged, adapted = net.refiner.encode_image(image), lora.eval().encode_image(image)
    assert torch.allclose(merged, adapted, atol=1e-4)


def test_resume_after_kill_from_scratch(data):
    ov = overrides(data, epochs=400, val_interval=1000, ckpt_root=str(data / "ckpt_kill"), from_scratch=True)
    last = data / "ckpt_kill" / "ultrarefiner" / "BUSI" / "fold_0" / "last.pt"
    kill_when_written(bundle_argv("run", "ultrarefiner", TRAIN, ov), last, settle=1)
    epoch_at_kill = torch.load(last, weights_only=False)["epoch"]  # the kill never leaves a half-written file
    assert 1 <= epoch_at_kill < 400
    res = bundle_cmd("run", "ultrarefiner", TRAIN, {**ov, "epochs": epoch_at_kill + 1})
    assert_ok(res)
    out = res.stdout + res.stderr
    assert "resumed from" in out and "--from_scratch" in out
    resumed = torch.load(last, weights_only=False)
    assert resumed["epoch"] == epoch_at_kill + 1
    # the schedule follows the restarted run's iterations (2 per epoch), not the killed run's 400 epochs
    assert resumed["lr_scheduler"]["t_total"] == (epoch_at_kill + 1) * 2


def test_evaluate_coarse_vs_refined_with_iterations_and_gate(trained):
    data, _ = trained
    res = bundle_cmd("run", "ultrarefiner", ["train.json", "evaluate.json"],
                     overrides(data, iterations=1, quality_gate=True))
    assert_ok(res)
    ev = data / "ckpt" / "ultrarefiner" / "BUSI" / "fold_0" / "eval_test_iter1_gate"
    summary = json.loads((ev / "summary.json").read_text())
    n_test = len(json.loads((data / "processed" / "BUSI" / "datalist.json").read_text())["testing"])
    assert summary["n_images"] == n_test
    assert summary["pred_keys"] == ["coarse", "refined", "iterative", "gated"]
    for key in summary["pred_keys"]:
        for m in ("dice", "iou", "precision", "recall", "accuracy", "hd95"):
            assert f"{key}_{m}" in summary["metrics"]
    assert "BUSI" in summary["per_dataset"]
    comps = summary["comparisons"]["all"]
    assert {"refined_vs_coarse", "iterative_vs_coarse", "gated_vs_coarse", "iterative_vs_refined"} <= set(comps)
    dice = comps["refined_vs_coarse"]["dice"]
    assert dice["improved"] + dice["worsened"] + dice["unchanged"] == n_test and len(dice["ci95"]) == 2
    rows = (ev / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("image,dataset,height,width,coarse_dice") and len(rows) == n_test + 1
    assert ",BUSI,96,128," in rows[1]  # native size
    assert (ev / "comparison.csv").read_text().startswith("dataset,comparison,metric")
    assert list((ev / "overlays").glob("*.png"))
    out = res.stdout + res.stderr
    assert "refined-coarse [95% CI]" in out


def test_inference_config(trained, tmp_path):
    data, _ = trained
    from PIL import Image

    images = sorted((data / "processed" / "BUSI" / "images").glob("*.png"))[:2]
    src = tmp_path / "in"
    src.mkdir()
    for p in images:
        (src / p.name).write_bytes(p.read_bytes())
    res = bundle_cmd("run", "ultrarefiner", ["inference.json"],
                     {"input_dir": str(src), "output_dir": str(tmp_path / "out"),
                      "ckpt_path": str(data / "models" / "model.pt"), **NET})
    assert_ok(res)
    report = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert report["n_images"] == 2 and report["skipped"] == []
    from ultrarefiner.data.imaging import read_image
    from ultrarefiner.engines.inference.ultra_predict import UltraPredictor
    from ultrarefiner.hub import create_model

    # the same model.pt predicted here in-process: the report holds SAM's IoU estimate of the refined mask written
    model = create_model("ultrarefiner", data / "models" / "model.pt")  # the exported file describes its network
    predictor = UltraPredictor(model, "cpu", amp=False)
    for e in report["images"]:
        ref = predictor.predict_array(read_image(e["image"]))
        assert e["pred_iou"] == pytest.approx(ref["pred_iou"], abs=1e-5)
        refined = np.asarray(Image.open(tmp_path / "out" / e["refined"])) > 0
        assert np.array_equal(refined, ref["refined"] > 0.5) and e["refined_area"] == int(refined.sum())
        for kind in ("coarse", "refined", "overlay"):
            assert Image.open(tmp_path / "out" / e[kind]).size == (128, 96)


def test_multi_gpu_config_with_gloo(data):
    ov = overrides(data, epochs=1, epoch_length=1, output_dir=str(data / "ddp_out"),
                   model_path=str(data / "ddp_model.pt"))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "monai.bundle"]
    res = bundle_cmd("run", "ultrarefiner", TRAIN + ["multi_gpu_train.json"], ov, timeout=600, python=launcher)
    assert_ok(res)
    assert (data / "ddp_out" / "last.pt").is_file() and (data / "ddp_out" / "best.pt").is_file()


def test_verify_metadata_net_in_out_and_export(trained, tmp_path):
    """The bundle commands, called in-process (the same functions ``python -m monai.bundle`` runs)."""
    from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out

    data, _ = trained
    verify_metadata(meta_file=str(BUNDLE / "configs" / "metadata.json"), filepath=str(SCHEMA))
    meta = tmp_path / "metadata.json"
    m = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    for io in ("inputs", "outputs"):
        for v in m["network_data_format"][io].values():
            v["spatial_shape"] = [48, 64]
    meta.write_text(json.dumps(m))
    config = str(BUNDLE / "configs" / "inference.json")
    verify_net_in_out(net_id="network_def", meta_file=str(meta), config_file=config, device="cpu", **NET)
    ts = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(data / "models" / "model.pt"),
                key_in_ckpt="model", meta_file=str(meta), config_file=config, use_trace=True,
                bundle_root=str(BUNDLE), image_resize="torch", **NET)
    from ultrarefiner.hub import create_model
    from ultrarefiner.networks.ultra_refiner import UltraRefinerExport

    model = create_model("ultrarefiner", data / "ckpt" / "ultrarefiner" / "BUSI" / "fold_0" / "best.pt")
    model.refiner.geometry.image_resize = "torch"
    eager = UltraRefinerExport.from_model(model).eval()
    x = torch.rand(1, 1, 48, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        traced, ref = torch.jit.load(str(ts))(x), eager(x)
    assert traced.shape == (1, 2, 48, 64) and torch.allclose(traced, ref, atol=1e-4)
    # the self-describing file as it is (no --key_in_ckpt): network_def unwraps it, strictly (never random weights)
    bare = tmp_path / "model_bare.ts"
    ckpt_export(net_id="network_def", filepath=str(bare), ckpt_file=str(data / "models" / "model.pt"),
                meta_file=str(meta), config_file=config, use_trace=True, bundle_root=str(BUNDLE),
                image_resize="torch", **NET)
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(bare))(x), ref, atol=1e-4)
