"""bundles/sam_refiner: train, resume after a kill, per-bucket evaluation, inference, multi-GPU (gloo on CPU), LoRA
checkpoints with option-B data, verify, export.

Tiny settings (a 64-pixel SAM from ``build_tiny_sam`` through the ``sam_def`` config id, 1-2 iterations per run) on
the real configs and code paths.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

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
from ultrarefiner.data.imaging import read_image
from ultrarefiner.engines.checkpoints.checkpoint import config_fingerprint
from ultrarefiner.engines.checkpoints.refiner_checkpoint import load_refiner_checkpoint
from ultrarefiner.errors import BadInputError, BadOptionError
from ultrarefiner.networks import SAMRefiner, StackedInputRefiner, build_tiny_sam
from ultrarefiner.networks.embedding_cache import weights_fingerprint

BUNDLE = "sam_refiner"
TRAIN = ["train.json"]
# the one SAM builder at 64 pixels: random with sam_checkpoint "" (no weights exist), else the given file
TINY_SAM = "$ultrarefiner.networks.build_sam('tiny', @sam_checkpoint, img_size=64)"
TINY = {"sam_def": TINY_SAM, "sam_checkpoint": "", "batch_size": 2, "num_workers": 0, "epoch_length": 1}


def tiny_refiner(**kwargs) -> SAMRefiner:
    return SAMRefiner(build_tiny_sam(img_size=64), preprocessing="medsam", **kwargs)  # what TINY_SAM builds


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return preprocessed_phantoms(tmp_path_factory.mktemp("sr"))


def overrides(data: Path, **extra) -> dict:
    return phantom_overrides(data, TINY, **extra)


@pytest.fixture(scope="module")
def trained(data):
    res = bundle_cmd("run", BUNDLE, TRAIN, overrides(data, epochs=2))
    assert_ok(res)
    return data, res


def test_stacked_input_refiner_wraps_the_refiner():
    refiner = tiny_refiner()
    net = StackedInputRefiner(refiner).eval()
    assert list(net.state_dict()) == list(refiner.state_dict())  # same keys: model.pt loads into either
    assert not refiner.training and net.train().refiner.training
    net.eval()
    x = torch.rand(1, 2, 40, 56)
    with torch.no_grad():
        ref = refiner(image=x[:, :1] * 255, coarse=x[:, 1:])["masks"]
        assert torch.equal(net(x), ref) and net(x).shape == (1, 1, 40, 56)
    with pytest.raises(ValueError, match=r"\(B,2,H,W\)"):
        net(torch.rand(1, 3, 40, 56))
    with pytest.raises(ValueError, match="image_resize='torch'"):
        torch.jit.trace(net, x)


def config_datasets(data: Path, configs=("train.json",), **options) -> ConfigParser:
    """The bundle's configs with the test's tiny network and ``options`` (as ``--name value`` would set them)."""
    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / BUNDLE / "configs" / c) for c in configs])
    parser.update(overrides(data, **options))
    return parser


def test_data_sources(data, tmp_path):
    """The configs' choice of coarse masks (``data_source``, ``real_ratio``): option A online or shards, option B, a
    mix; evaluation sets of the val and test splits."""
    from refiner_toy import write_predictions

    from ultrarefiner.data.augmented import generate
    from ultrarefiner.data.refiner_data import (
        MixedRefinerDataset,
        PredictionCoarseDataset,
        ShardCoarseDataset,
        SimulatedCoarseDataset,
    )
    from ultrarefiner.engines.training.refiner_setup import inference_datalist

    preds = write_predictions(data / "processed" / "BUSI" / "datalist.json", tmp_path / "pred", n_splits=2).parent
    generate(data / "processed", tmp_path / "aug", ["BUSI"], 4, fold=0, shard_size=4, resolution=64, progress=False)

    def train_set(**options) -> MixedRefinerDataset:
        ds = config_datasets(data, **{"predictions_dir": str(preds), **options}).get_parsed_content("train#dataset")
        assert isinstance(ds, MixedRefinerDataset)
        return ds

    online = train_set()
    assert isinstance(online.simulated, SimulatedCoarseDataset) and online.real is None and online.n_real == 0
    assert len(online) == len(online.simulated) and all(online.plan()[i] == (0, i) for i in range(len(online)))
    sample, alone = online[1], online.simulated[1]  # served as the source alone would serve it
    assert sample["image_key"] == alone["image_key"] and torch.equal(sample["coarse"], alone["coarse"])
    shards = train_set(data_source="shards", shards_dir=str(tmp_path / "aug" / "BUSI" / "fold_0"))
    assert isinstance(shards.simulated, ShardCoarseDataset) and len(shards) == 4
    real = train_set(data_source="predictions")
    assert real.simulated is None and isinstance(real.real, PredictionCoarseDataset) and real.n_real == len(real)
    assert all(it["fold"] != 0 for it in real.real.items)
    mix = train_set(real_ratio=0.5, **{"train#dataset#length": 6})
    assert isinstance(mix.simulated, SimulatedCoarseDataset) and mix.n_real == 3 and len(mix) == 6
    with pytest.raises(RuntimeError) as err:  # monai names the component, the cause names the file
        train_set(real_ratio=0.5, predictions_dir=str(tmp_path / "nowhere"))
    assert isinstance(err.value.__cause__, BadInputError) and "nowhere" in str(err.value.__cause__)
    with pytest.raises(RuntimeError) as err:
        train_set(data_source="sims")
    cause = err.value.__cause__  # the option and its choices, not a bare KeyError
    assert isinstance(cause, BadOptionError) and "--data_source" in str(cause) and "'sims'" in str(cause)

    def eval_set(**options):
        # evaluate.json's network (its geometry, its embedding cache) comes from the checkpoint (create_model); no
        # checkpoint exists here, and the untrained tiny network_def has the same geometry
        options = {"predictions_dir": str(preds), "network": "$@network_def.refiner", **options}
        return config_datasets(data, ("train.json", "evaluate.json"), **options).get_parsed_content("validate#dataset")

    test_sim = eval_set(eval_samples_per_image=2)
    sample = test_sim[0]
    assert isinstance(test_sim, SimulatedCoarseDataset) and test_sim.frame == "native"
    assert sample["original_size"].tolist() == list(sample["label"].shape[-2:]) == [96, 128] and not sample["flip"]
    assert len(test_sim) == 2 * len(test_sim.items) and all(it["fold"] == -1 for it in test_sim.items)
    test_real = eval_set(eval_coarse="predictions")
    assert isinstance(test_real, PredictionCoarseDataset) and test_real.split == "test"
    assert all("fold_0/" in it["coarse"] for it in test_real.items)  # fold 0's TransUNet predicted them
    val = config_datasets(data, real_ratio=0.5, predictions_dir=str(preds)).get_parsed_content("validate#dataset")
    assert isinstance(val, PredictionCoarseDataset) and val.split == "val"  # val_coarse follows the training mix
    with pytest.raises(BadInputError, match="coarse masks folder not found"):
        inference_datalist(data / "processed" / "BUSI" / "images", tmp_path / "nowhere")
    (tmp_path / "few").mkdir()
    with pytest.raises(BadInputError, match="coarse mask of .* not found"):
        inference_datalist(data / "processed" / "BUSI" / "images", tmp_path / "few")


def test_train_writes_checkpoints_and_report(trained):
    data, res = trained
    fold = data / "ckpt" / "sam_refiner" / "BUSI" / "fold_0"
    best = torch.load(fold / "best.pt", weights_only=True)
    last = torch.load(fold / "last.pt", weights_only=False)
    assert best["lora"] is False
    assert_best_is_reported(best, last, res.stdout + res.stderr)
    kwargs = best["network_kwargs"]  # the bundle's prompt settings; None: inferred from the encoder
    assert kwargs["preprocessing"] is None and kwargs["multimask_output"] is None
    assert kwargs["use_point_prompt"] is False and kwargs["box_source"] == "largest"
    rebuilt = SAMRefiner(build_tiny_sam(img_size=64), **{k: kwargs[k] for k in ("preprocessing", "multimask_output")})
    assert rebuilt.preprocessing == "medsam" and rebuilt.multimask_output is False
    assert last["epoch"] == 2 and "optimizer" in last and "lr_scheduler" in last
    # frozen encoder: best.pt holds only what trained, and a fingerprint of the encoder it was trained with
    initial = build_tiny_sam(img_size=64)
    assert best["partial"] is True and best["model"]
    assert all(k.startswith(("sam.prompt_encoder.", "sam.mask_decoder.")) for k in best["model"])
    assert {k for k in tiny_refiner().state_dict() if k.startswith(("sam.prompt_encoder.", "sam.mask_decoder."))} \
        == set(best["model"])
    assert best["encoder"] == {"class": "ImageEncoderViT", "fingerprint": weights_fingerprint(initial.image_encoder)}
    # models/model.pt: the same partial form, no optimizer state, loads into a fresh refiner
    model = torch.load(data / "models" / "model.pt", weights_only=True)
    assert set(model) >= {"model", "partial", "encoder", "network_kwargs"} and "optimizer" not in model
    assert model["partial"] is True and model["encoder"] == best["encoder"]
    assert model["network_kwargs"] == best["network_kwargs"]
    # the run they belong to, in best.pt, last.pt and the exported model
    assert best["identity"] == last["identity"] == model["identity"] == {
        "phase": "sam_refiner", "dataset": "BUSI", "fold": 0, "fingerprint": config_fingerprint(kwargs)}
    assert best["settings"]["epochs"] == 2 and best["settings"]["data_source"] == "simulated"
    assert model["model"].keys() == best["model"].keys()
    assert all(torch.equal(v, best["model"][k]) for k, v in model["model"].items())
    from_model, from_best = tiny_refiner().eval(), tiny_refiner().eval()
    load_refiner_checkpoint(from_model, data / "models" / "model.pt")
    load_refiner_checkpoint(from_best, fold / "best.pt")
    sd = from_model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in model["model"].items())
    assert all(torch.equal(sd[f"sam.{k}"], v) for k, v in initial.state_dict().items()
               if k.startswith("image_encoder."))  # frozen encoder untouched (the base weights)
    assert any(not torch.equal(sd[f"sam.{k}"], v) for k, v in initial.state_dict().items()
               if k.startswith("mask_decoder."))  # decoder trained
    x, coarse = torch.rand(1, 1, 48, 64) * 255, torch.zeros(1, 1, 48, 64)
    coarse[..., 10:30, 20:40] = 1.0
    with torch.no_grad():
        assert torch.equal(from_model(image=x, coarse=coarse)["masks"], from_best(image=x, coarse=coarse)["masks"])
    # the record describes the tiny SAM as built (read from it), so the file alone rebuilds the refiner
    assert kwargs["model_type"] == "tiny" and kwargs["sam_kwargs"]["img_size"] == 64
    from ultrarefiner import create_model

    hub = create_model("sam_refiner", data / "models" / "model.pt", sam_checkpoint="",
                       **{k: kwargs[k] for k in ("use_point_prompt", "box_source")})
    with torch.no_grad():
        assert torch.equal(hub(image=x, coarse=coarse)["masks"], from_model(image=x, coarse=coarse)["masks"])
    # a decoder never meets an encoder it was not trained with
    with pytest.raises(BadInputError, match="another image encoder"):
        load_refiner_checkpoint(SAMRefiner(build_tiny_sam(img_size=64, seed=1)), data / "models" / "model.pt")
    assert any((fold / "tensorboard").iterdir()) and any((fold / "tensorboard" / "overlays").iterdir())
    out = res.stdout + res.stderr
    assert "[TRAIN]" in out and "[VALIDATION]" in out and "Input Dice" in out
    assert "SAM tiny starts from random initialisation" in out


def test_resume_after_kill(data):
    ov = overrides(data, epochs=400, ckpt_root=str(data / "ckpt_kill"), model_path=str(data / "kill.pt"))
    last = data / "ckpt_kill" / "sam_refiner" / "BUSI" / "fold_0" / "last.pt"
    kill_when_written(bundle_argv("run", BUNDLE, TRAIN, ov), last, settle=2)
    epoch_at_kill = torch.load(last, weights_only=False)["epoch"]  # the kill never leaves a half-written file
    assert 1 <= epoch_at_kill < 400
    res = bundle_cmd("run", BUNDLE, TRAIN, {**ov, "epochs": epoch_at_kill + 1})
    assert_ok(res)
    assert "resumed from" in res.stdout + res.stderr
    assert torch.load(last, weights_only=False)["epoch"] == epoch_at_kill + 1


def test_evaluate_per_bucket_table(trained):
    data, _ = trained
    res = bundle_cmd("run", BUNDLE, ["train.json", "evaluate.json"], overrides(data, eval_samples_per_image=2))
    assert_ok(res)
    ev = data / "ckpt" / "sam_refiner" / "BUSI" / "fold_0" / "eval_test"
    testing = json.loads((data / "processed" / "BUSI" / "datalist.json").read_text())["testing"]
    n = 2 * sum(it["class"] != "normal" for it in testing)
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["n_images"] == n
    for k in ("dice", "iou", "precision", "recall", "accuracy", "hd95"):
        assert f"input_{k}" in summary["metrics"] and f"refined_{k}" in summary["metrics"]
    rows = (ev / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("image,sample,dataset,kind,bucket,height,width,input_dice") and len(rows) == n + 1
    assert ",96,128," in rows[1]  # native size
    buckets = json.loads((ev / "buckets.json").read_text())
    assert buckets[-1]["bucket"] == "all" and buckets[-1]["n"] == n == sum(b["n"] for b in buckets[:-1])
    assert {b["bucket"] for b in buckets[:-1]} <= {"perfect", "mild", "heavy"}
    assert (ev / "buckets.csv").read_text().splitlines()[0].startswith("bucket,n,input_dice")
    assert abs(buckets[-1]["refined_dice"] - summary["metrics"]["refined_dice"]["mean"]) < 1e-6
    assert list((ev / "overlays").glob("*.png"))
    assert "input vs refined Dice per quality bucket" in res.stdout + res.stderr


def test_inference(trained, tmp_path):
    data, _ = trained
    images = data / "processed" / "BUSI" / "images"
    shutil.copytree(data / "processed" / "BUSI" / "masks", tmp_path / "coarse")
    first = sorted((tmp_path / "coarse").glob("*.png"))[0]  # the output checked below: given as a 0/1 label map
    Image.fromarray(np.asarray(Image.open(first)) // 255).save(first)
    res = bundle_cmd("run", BUNDLE, ["inference.json"], {
        "input_dir": str(images), "coarse_dir": str(tmp_path / "coarse"), "output_dir": str(tmp_path / "pred"),
        "ckpt_path": str(data / "models" / "model.pt"), "sam_def": TINY_SAM, "sam_checkpoint": "",
        "optimize": "jit_freeze"})  # float32 on every CPU (auto is bf16 where the CPU has native bfloat16)
    assert_ok(res)
    outs = sorted((tmp_path / "pred").rglob("*.png"))
    assert len(outs) == len(list(images.glob("*.png")))
    name = outs[0].name.replace("_seg", "")
    got = np.asarray(Image.open(outs[0])) > 127
    refiner = tiny_refiner().eval()
    load_refiner_checkpoint(refiner, data / "models" / "model.pt")
    image = torch.from_numpy(read_image(images / name).astype(np.float32))[None, None]
    assert name == first.name
    coarse = torch.from_numpy(read_image(data / "processed" / "BUSI" / "masks" / name).astype(np.float32) / 255)
    coarse = coarse[None, None]
    with torch.no_grad():
        ref = refiner(image=image, coarse=coarse)["masks"][0, 0] > 0
    assert got.shape == tuple(image.shape[-2:]) and np.array_equal(got, ref.numpy())


def test_inference_preprocessing_reads_label_maps_and_refuses_other_sizes(data, tmp_path):
    """inference.json's preprocessing: a 0/1 coarse mask is its 0/255 twin (read as 0-255 intensities it was a
    blank probability map, at most 1/255); a coarse mask of another size is refused, naming both files."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / BUNDLE / "configs" / "inference.json"))
    preprocessing = parser.get_parsed_content("preprocessing")
    images = data / "processed" / "BUSI"
    image, mask = sorted((images / "images").glob("*.png"))[0], sorted((images / "masks").glob("*.png"))[0]
    levels = np.asarray(Image.open(mask))
    assert levels.max() == 255
    Image.fromarray(levels // 255).save(tmp_path / "levels01.png")
    Image.fromarray(levels[:-8]).save(tmp_path / "short.png")
    twin = preprocessing({"image": str(image), "coarse": str(mask)})["image"]
    got = preprocessing({"image": str(image), "coarse": str(tmp_path / "levels01.png")})["image"]
    assert float(twin[1].max()) == 1.0 and torch.equal(got, twin)
    with pytest.raises(RuntimeError) as error:  # MONAI's "applying transform", from the transform's own error
        preprocessing({"image": str(image), "coarse": str(tmp_path / "short.png")})
    cause = error.value.__cause__
    assert isinstance(cause, BadInputError) and "short.png" in str(cause) and image.name in str(cause)


@pytest.mark.parametrize("classes", ["1,2", [2]])
def test_inference_preprocessing_reads_class_maps_by_coarse_classes(data, tmp_path, caplog, classes):
    """--coarse_classes 1,2 (a string, as monai.bundle run passes it, or a list) reads a multi-class segmenter's 0/2
    map as its 0/255 twin. Without it that map reads blank, which the inference cannot skip: a warning names the
    file, what its values look like and the option."""
    images = data / "processed" / "BUSI"
    image, mask = sorted((images / "images").glob("*.png"))[0], sorted((images / "masks").glob("*.png"))[0]
    Image.fromarray((np.asarray(Image.open(mask)) > 127).astype(np.uint8) * 2).save(tmp_path / "classes.png")

    def preprocessing(**ids):
        parser = ConfigParser()
        parser.read_config(str(REPO / "bundles" / BUNDLE / "configs" / "inference.json"))
        parser.update(ids)
        return parser.get_parsed_content("preprocessing")

    twin = preprocessing()({"image": str(image), "coarse": str(mask)})["image"]
    got = preprocessing(coarse_classes=classes)({"image": str(image), "coarse": str(tmp_path / "classes.png")})
    assert float(twin[1].max()) == 1.0 and torch.equal(got["image"], twin)
    with caplog.at_level(logging.WARNING, logger="ultrarefiner.transforms.io"):
        blank = preprocessing()({"image": str(image), "coarse": str(tmp_path / "classes.png")})["image"]
    assert float(blank[1].max()) < 0.5  # 2 / 255: background
    assert f"{tmp_path / 'classes.png'}: blank coarse mask: holds only the values 0, 2" in caplog.text
    assert "or pass --coarse_classes with the lesion's values" in caplog.text


def test_multi_gpu_config_with_gloo(data):
    ov = overrides(data, epochs=1, epoch_length=2, ckpt_root=str(data / "ckpt_ddp"), model_path=str(data / "ddp.pt"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "monai.bundle"]
    res = bundle_cmd("run", BUNDLE, ["train.json", "multi_gpu_train.json"], ov, timeout=600, python=torchrun)
    assert_ok(res)
    fold = data / "ckpt_ddp" / "sam_refiner" / "BUSI" / "fold_0"
    assert (fold / "last.pt").is_file() and (fold / "best.pt").is_file() and (data / "ddp.pt").is_file()


def test_lora_checkpoint_with_real_coarse_masks(data, tmp_path):
    """LoRA on MedSAM-style base weights, option A mixed with out-of-fold predictions (option B)."""
    from refiner_toy import write_predictions

    torch.save(build_tiny_sam(img_size=64).state_dict(), tmp_path / "sam.pth")
    preds = write_predictions(data / "processed" / "BUSI" / "datalist.json", tmp_path / "pred", n_splits=2).parent
    ov = overrides(data, epochs=1, ckpt_root=str(tmp_path / "ckpt"), model_path=str(tmp_path / "model.pt"),
                   use_lora="True", sam_checkpoint=str(tmp_path / "sam.pth"), real_ratio=0.5,
                   predictions_dir=str(preds))
    res = bundle_cmd("run", BUNDLE, TRAIN, ov)
    assert_ok(res)
    assert f"SAM tiny initialised from {tmp_path / 'sam.pth'}" in res.stdout + res.stderr
    best_path = tmp_path / "ckpt" / "sam_refiner" / "BUSI" / "fold_0" / "best.pt"
    best = torch.load(best_path, weights_only=True)
    keys = list(best["model"])
    assert best["lora"] is True and any(k.endswith(".lora_A") for k in keys)
    assert all(k.endswith((".lora_A", ".lora_B")) or k.startswith(("sam.prompt_encoder.", "sam.mask_decoder."))
               for k in keys)
    base_encoder = build_tiny_sam(img_size=64).image_encoder  # the record is of the base weights, not the adapters
    assert best["partial"] is True and best["encoder"]["fingerprint"] == weights_fingerprint(base_encoder)
    lora = tiny_refiner(use_lora=True).eval()
    load_refiner_checkpoint(lora, best_path)
    plain = tiny_refiner().eval()  # models/model.pt: adapters merged, loads without LoRA
    assert load_refiner_checkpoint(plain, tmp_path / "model.pt")["network_kwargs"]["use_lora"] is False
    x = torch.rand(1, 1, 48, 64) * 255
    coarse = torch.zeros(1, 1, 48, 64)
    coarse[..., 10:30, 20:40] = 1.0
    with torch.no_grad():
        a = lora(image=x, coarse=coarse)["masks"]
        b = plain(image=x, coarse=coarse)["masks"]
    assert torch.allclose(a, b, atol=1e-4)


def test_verify_metadata_net_in_out_and_export(trained, tmp_path):
    data, _ = trained
    assert_ok(verify_metadata(BUNDLE))
    assert_ok(bundle_cmd("verify_net_in_out", BUNDLE, ["inference.json"],
                         {"net_id": "network_def", "sam_def": TINY_SAM, "sam_checkpoint": "", "any": 48}))
    ts = tmp_path / "model.ts"
    res = bundle_cmd("ckpt_export", BUNDLE, ["inference.json"], {
        "net_id": "network_def", "filepath": str(ts), "ckpt_file": str(data / "models" / "model.pt"),
        "use_trace": True, "input_shape": [1, 2, 96, 128], "image_resize": "torch", "sam_def": TINY_SAM,
        "sam_checkpoint": ""})
    assert_ok(res)
    traced = torch.jit.load(str(ts))
    ref = StackedInputRefiner(tiny_refiner(image_resize="torch")).eval()
    load_refiner_checkpoint(ref.refiner, data / "models" / "model.pt")
    x = torch.rand(1, 2, 96, 128)
    with torch.no_grad():
        assert torch.allclose(traced(x), ref(x), atol=1e-4)
