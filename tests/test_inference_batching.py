"""Batched inference gives what batch 1 gives: ``refine`` (images of any sizes share the encoder's, the prompts'
and the decoder's pass), ``predict`` (TransUNet and the encoder on the whole batch) and TransUNet's out-of-fold
predictions; the encoder speed options keep the masks; the sam_refiner bundle's loader batches one size at a
time. No timings are asserted here (benchmarks/bench_inference.py measures them)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from bundle_utils import REPO
from conftest import blob, save
from ultrarefiner.engines.inference import refine_folder as engine
from ultrarefiner.engines.inference.fast_inference import native_bf16_cpu, resolve_optimize, same_size_batches
from ultrarefiner.networks import SAMRefiner
from ultrarefiner.networks.sam_weights import build_tiny_sam

SIZES = [(96, 128), (80, 120), (96, 128), (70, 90)]


def _scene(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image, coarse 0/255): a bright off-centre blob on noise; the coarse mask a shifted, smaller blob."""
    rng = np.random.default_rng(seed)
    fg = blob(h, w, cy=h // 2 - 5, cx=w // 3, r=min(h, w) // 4) > 0
    image = np.clip(60 + 120 * fg + rng.normal(0, 12, (h, w)), 0, 255).astype(np.uint8)
    coarse = blob(h, w, cy=h // 2 - 2, cx=w // 3 + 4, r=min(h, w) // 5) > 0
    return image, coarse.astype(np.uint8) * 255


def _sample(refiner: SAMRefiner, image: np.ndarray, coarse: np.ndarray) -> dict:
    return {"pixels": image, "coarse": coarse, "frame": engine.encoder_frame(refiner.geometry, image)}


@pytest.fixture(scope="module")
def lite_medsam() -> SAMRefiner:
    return SAMRefiner().eval()  # LiteMedSAM, packaged weights (the default refiner, zero-shot)


def test_litemedsam_batch_of_three_sizes_equals_batch_one(lite_medsam):
    """Real LiteMedSAM: batch 3 (two sizes) vs batch 1 vs the refiner's own forward on the native image."""
    scenes = [_scene(h, w, i) for i, (h, w) in enumerate(SIZES[:3])]
    samples = [_sample(lite_medsam, im, c) for im, c in scenes]
    runner = engine.BatchRefiner(lite_medsam, torch.device("cpu"), optimize="none")
    p3, iou3 = runner.probabilities(samples)
    singles = [runner.probabilities([s]) for s in samples]
    for (image, _), a, b, (p1, iou1) in zip(scenes, p3, iou3, singles, strict=True):
        assert a.shape == image.shape and torch.allclose(a, p1[0], atol=1e-4)
        assert float(b) == pytest.approx(float(iou1[0]), abs=1e-4)
        assert ((a > 0.5) != (p1[0] > 0.5)).float().mean() <= 1e-3
    for (image, coarse), (p1, _) in zip(scenes, singles, strict=True):
        native = torch.from_numpy(image)[None, None]
        with torch.no_grad():
            framed = lite_medsam(image=native, coarse=engine.prompt_frame_masks(lite_medsam.geometry, [coarse],
                                                                                 torch.device("cpu")))
            own = lite_medsam(image=native, coarse=torch.from_numpy(coarse)[None, None].float() / 255)
        # batch 1 through the worker-resized frame is the refiner's own computation on the prompt-frame mask
        assert torch.allclose(p1[0], torch.sigmoid(framed["masks"][0, 0]), atol=1e-5)
        # and within an encoder pixel of the prompts from the native mask: the same lesion
        scale = max(image.shape) / lite_medsam.geometry.img_size
        assert (framed["prompts"]["boxes"] - own["prompts"]["boxes"]).abs().max() <= scale
        assert ((p1[0] > 0.5) != (torch.sigmoid(own["masks"][0, 0]) > 0.5)).float().mean() <= 1e-3


@pytest.mark.parametrize("optimize", ["channels_last", "jit_freeze", "bf16"])
def test_encoder_speed_options_keep_the_masks(lite_medsam, optimize):
    """float32 options: the same numbers up to rounding; bf16 (opt-in, CPUs with native bfloat16): close."""
    if optimize == "bf16" and not native_bf16_cpu():
        pytest.skip("no native bfloat16 on this CPU")
    image, coarse = _scene(*SIZES[1], seed=5)
    samples = [_sample(lite_medsam, image, coarse)] * 2
    plain, iou = engine.BatchRefiner(lite_medsam, torch.device("cpu"), optimize="none").probabilities(samples)
    fast, fast_iou = engine.BatchRefiner(lite_medsam, torch.device("cpu"), optimize=optimize).probabilities(samples)
    lite_medsam.sam.image_encoder.to(memory_format=torch.contiguous_format)  # converted in place: back
    tol, pixels = (1e-4, 1e-3) if optimize != "bf16" else (0.1, 0.02)
    assert torch.allclose(fast_iou, iou, atol=tol) and (fast[0] - plain[0]).abs().mean() <= tol
    assert ((fast[0] > 0.5) != (plain[0] > 0.5)).float().mean() <= pixels


def test_compiled_encoder_keeps_the_masks_and_is_a_snapshot():
    """``optimize="compile"``: torch.compile with inductor's freezing on a CPU, float32 (the same masks as eager).
    Freezing folds some weights in as constants, so it compiles a copy: like jit_freeze, a whole snapshot of the
    weights it was built from, never a mix of folded old weights and live new ones."""
    refiner = _tiny_refiner()
    image, coarse = _scene(*SIZES[0], seed=3)
    samples = [_sample(refiner, image, coarse)]
    plain, iou = engine.BatchRefiner(refiner, torch.device("cpu"), optimize="none").probabilities(samples)
    compiled = engine.BatchRefiner(refiner, torch.device("cpu"), optimize="compile")
    fast, fast_iou = compiled.probabilities(samples)
    assert torch.allclose(fast_iou, iou, atol=1e-4) and (fast[0] - plain[0]).abs().max() <= 1e-4
    with torch.no_grad():  # freezing on: the compiled encoder keeps the weights it was compiled with
        for p in refiner.sam.image_encoder.parameters():
            p.mul_(0.5)
    again, _ = compiled.probabilities(samples)
    assert torch.equal(again[0], fast[0])


def _tiny_refiner() -> SAMRefiner:
    # MedSAM-style geometry with its exact (CPU) resize: the data workers do it
    return SAMRefiner(build_tiny_sam(img_size=64), checkpoint=None, preprocessing="medsam").eval()


def test_auto_is_bf16_on_a_cpu_with_native_bfloat16_else_float32(monkeypatch):
    """``optimize="auto"``: bf16 on a CPU with native bfloat16 (measured: same Dice as float32 on BUSI's test split,
    1.7x faster), jit_freeze (float32) on other CPUs, channels_last on CUDA; an explicit bf16 falls back to
    jit_freeze where bfloat16 is emulated."""
    from ultrarefiner.engines.inference import fast_inference

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native, expected in ((True, "bf16"), (False, "jit_freeze")):
        monkeypatch.setattr(fast_inference, "native_bf16_cpu", lambda native=native: native)
        assert resolve_optimize("auto", cpu) == resolve_optimize(None, cpu) == expected
        assert resolve_optimize("bf16", cpu) == expected and resolve_optimize("jit_freeze", cpu) == "jit_freeze"
        assert resolve_optimize("auto", cuda) == "channels_last"


def test_refine_folder_batch_three_writes_what_batch_one_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "create_model", lambda *_, **__: _tiny_refiner())
    for i, (h, w) in enumerate(SIZES):
        image, coarse = _scene(h, w, i)
        save(tmp_path / "img" / f"s{i}.png", image)
        save(tmp_path / "msk" / f"s{i}.png", coarse)
    reports = {}
    for b in (1, 3):
        reports[b] = engine.refine_folder(tmp_path / "img", tmp_path / "msk", tmp_path / f"out{b}", zero_shot=True,
                                          batch_size=b, device="cpu", num_workers=2, optimize="none")
    assert [r["stem"] for r in reports[1]["images"]] == [r["stem"] for r in reports[3]["images"]] == \
        [f"s{i}" for i in range(len(SIZES))]
    for r1, r3 in zip(reports[1]["images"], reports[3]["images"], strict=True):
        assert r1["pred_iou"] == pytest.approx(r3["pred_iou"], abs=1e-4)
        m1 = np.asarray(Image.open(tmp_path / "out1" / "masks" / f"{r1['stem']}.png"))
        m3 = np.asarray(Image.open(tmp_path / "out3" / "masks" / f"{r1['stem']}.png"))
        assert m1.shape == (r1["height"], r1["width"]) and (m1 != m3).mean() <= 1e-3


def test_predict_batch_three_equals_batch_one_and_refine(tmp_path):
    from test_predict import NETWORK_KWARGS

    from ultrarefiner.engines.inference.ultra_predict import UltraPredictor, refine, run_inference
    from ultrarefiner.engines.training.e2e_setup import build_ultrarefiner

    torch.manual_seed(0)
    model = build_ultrarefiner(NETWORK_KWARGS, cache_embeddings=False).eval()
    for i, (h, w) in enumerate(SIZES):
        save(tmp_path / "in" / f"p{i}.png", _scene(h, w, i)[0])
    reports = {}
    for b in (1, 3):  # the ultrarefiner bundle's inference evaluator
        reports[b] = run_inference(REPO / "bundles" / "ultrarefiner", {
            "network": model, "device": "cpu", "input_dir": str(tmp_path / "in"),
            "output_dir": str(tmp_path / f"out{b}"), "iterations": 1, "quality_gate": True, "batch_size": b,
            "num_workers": 2, "optimize": "none"})
    predictor = UltraPredictor(model, "cpu", iterations=1, quality_gate=True, optimize="none")
    for e1, e3 in zip(reports[1]["images"], reports[3]["images"], strict=True):
        assert e1["image"] == e3["image"] and e1["pred_iou"] == pytest.approx(e3["pred_iou"], abs=1e-4)
        for kind in ("coarse", "refined"):
            m1 = np.asarray(Image.open(tmp_path / "out1" / e1[kind]))
            m3 = np.asarray(Image.open(tmp_path / "out3" / e3[kind]))
            assert m1.shape == (e1["height"], e1["width"]) and (m1 != m3).mean() <= 1e-3
    # batch 1 is ``refine`` on the native image (the one routine of evaluation and the bundles)
    image = _scene(*SIZES[1], seed=1)[0]
    got = predictor.predict_array(image)
    native = torch.from_numpy(image)[None, None]
    small = torch.as_tensor(predictor.transform(native[0].float()), dtype=torch.float32)[None].clamp(0, 1)
    ref = refine(model, small, native, iterations=1, quality_gate=True)
    assert np.allclose(got["refined"], ref["final"][0, 0].numpy(), atol=1e-4)
    assert np.allclose(got["coarse"], ref["coarse"][0, 0].numpy(), atol=1e-5)
    assert got["pred_iou"] == pytest.approx(float(ref["pred_iou"][0]), abs=1e-5)
    # jit_freeze (float32): the encoder runs as a frozen trace, TransUNet as it is (no frozen copy: no gain measured)
    from ultrarefiner.engines.inference.fast_inference import FrozenEncoder

    frozen = UltraPredictor(model, "cpu", iterations=1, quality_gate=True, optimize="jit_freeze")
    assert frozen.coarse_net is model.transunet and isinstance(frozen.encoder, FrozenEncoder)
    fast = frozen.predict_array(image)
    assert np.allclose(fast["coarse"], got["coarse"], atol=1e-5) and np.allclose(fast["refined"], got["refined"],
                                                                                atol=1e-4)


def test_transunet_probabilities_batch_three_equals_batch_one(tmp_path):
    from ultrarefiner.engines.inference.transunet_predict import predict_probabilities
    from ultrarefiner.networks import TransUNet

    torch.manual_seed(1)
    model = TransUNet(img_size=32, num_classes=2, in_channels=1, variant="R50-ViT-B_16", vit_depth=1).eval()
    items = []
    for i, (h, w) in enumerate(SIZES):
        items.append({"image": str(save(tmp_path / f"t{i}.png", _scene(h, w, i)[0]))})
    one = predict_probabilities(model, items, 32, "cpu", batch_size=1, amp=False)
    three = predict_probabilities(model, items, 32, "cpu", batch_size=3, amp=False, num_workers=2)
    for a, b, (h, w) in zip(one, three, SIZES, strict=True):
        assert a.shape == b.shape == (h, w) and np.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("optimize", ["channels_last", "bf16"])
def test_transunet_speed_options_keep_the_probabilities(tmp_path, optimize):
    """``predict-transunet`` and ``predict`` run TransUNet through ``fast_segmenter``: channels_last gives the eager
    numbers up to rounding; bf16 (CPUs with native bfloat16; ``auto`` there) close ones, under autocast."""
    from ultrarefiner.engines.inference.fast_inference import fast_segmenter
    from ultrarefiner.engines.inference.transunet_predict import predict_probabilities
    from ultrarefiner.networks import TransUNet

    if optimize == "bf16" and not native_bf16_cpu():
        pytest.skip("no native bfloat16 on this CPU")
    torch.manual_seed(2)
    model = TransUNet(img_size=32, num_classes=2, in_channels=1, variant="R50-ViT-B_16", vit_depth=1).eval()
    items = [{"image": str(save(tmp_path / f"t{i}.png", _scene(h, w, i)[0]))} for i, (h, w) in enumerate(SIZES)]
    plain = predict_probabilities(model, items, 32, "cpu", batch_size=2, amp=False, optimize="none")
    fast = predict_probabilities(model, items, 32, "cpu", batch_size=2, amp=False, optimize=optimize)
    model.to(memory_format=torch.contiguous_format)  # converted in place: back
    tol = 1e-5 if optimize != "bf16" else 0.05
    for a, b in zip(plain, fast, strict=True):
        assert a.shape == b.shape and np.abs(a - b).max() <= tol
    if optimize == "bf16":  # the convolutions and matrix products run in bfloat16; float32 logits come out
        with torch.no_grad(), _MatmulDtypes() as seen:
            out = fast_segmenter(model, torch.device("cpu"), "bf16")(torch.rand(1, 1, 32, 32))
        model.to(memory_format=torch.contiguous_format)
        assert out.dtype == torch.float32 and seen.dtypes == {torch.bfloat16}


def _transunet_bundle(optimize: str | None = None, seed: int = 3):
    """The transunet bundle's ``inference.json`` parsed at a tiny size: (parser, its network_def seeded by seed)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "transunet" / "configs" / "inference.json"))
    parser.update({"img_size": 32, "vit_depth": 1, "device": "$torch.device('cpu')",
                   **({} if optimize is None else {"optimize": optimize})})
    torch.manual_seed(seed)
    return parser, parser.get_parsed_content("network_def").eval()


@pytest.mark.parametrize("optimize", ["channels_last", "bf16"])
def test_transunet_bundle_inferer_runs_the_speed_option(optimize):
    """The transunet bundle's ``inferer`` runs TransUNet as ``predict-transunet`` does (``fast_segmenter``) while its
    checkpoint still loads into the plain ``network_def``: ``optimize`` auto by default, channels_last the eager
    numbers up to rounding, bf16 (CPUs with native bfloat16) its products in bfloat16 with float32 logits out; a
    later weight load reaches the forward it built; an unknown option fails when the config is parsed."""
    from monai.inferers import SimpleInferer

    from ultrarefiner.engines.inference.flip_inferer import FastSegmenterInferer

    if optimize == "bf16" and not native_bf16_cpu():
        pytest.skip("no native bfloat16 on this CPU")
    parser, other = _transunet_bundle(seed=4)
    assert parser["optimize"] == "auto" and isinstance(parser.get_parsed_content("inferer"), FastSegmenterInferer)
    parser, net = _transunet_bundle(optimize)
    inferer = parser.get_parsed_content("inferer")
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        plain = SimpleInferer()(x, net)
        with _MatmulDtypes() as seen:
            fast = inferer(x, net)
        assert fast.dtype == torch.float32 and (fast - plain).abs().max() <= (1e-5 if optimize != "bf16" else 0.05)
        assert seen.dtypes == ({torch.bfloat16} if optimize == "bf16" else {torch.float32})
        assert net.decoder.conv_more[0].weight.is_contiguous(memory_format=torch.channels_last)
        net.load_state_dict(other.state_dict())  # other weights, as CheckpointLoader loads them: used, same layout
        assert (inferer(x, net) - SimpleInferer()(x, other)).abs().max() <= (1e-5 if optimize != "bf16" else 0.05)
    assert inferer.forward_for(net, x.device) is inferer.forward_for(net, x.device)
    parser.update({"optimize": "fast"})
    with pytest.raises(Exception) as failed:  # MONAI's "Failed to evaluate ConfigExpression", from ours
        parser.get_parsed_content("inferer", lazy=False)
    assert "optimize must be one of" in str(failed.value.__cause__ or failed.value.__context__)


def test_same_size_batches(tmp_path):
    items = []
    for i, (h, w) in enumerate([(20, 30), (10, 10), (20, 30), (20, 30), (10, 10)]):
        items.append({"image": str(save(tmp_path / f"x{i}.png", np.zeros((h, w), np.uint8)))})
    (tmp_path / "bad.png").write_bytes(b"not a png")
    items.append({"image": str(tmp_path / "bad.png")})
    assert same_size_batches(items, 2) == [[1, 4], [0, 2], [3], [5]]
    with pytest.raises(ValueError, match="batch_size"):
        same_size_batches(items, 0)


def test_sam_refiner_bundle_loader_batches_one_size(tmp_path):
    """The sam_refiner bundle's evaluator takes one native size per batch: its loader groups by size."""
    from monai.bundle import ConfigParser

    from conftest import REPO

    for i, (h, w) in enumerate(SIZES):
        image, coarse = _scene(h, w, i)
        save(tmp_path / "img" / f"b{i}.png", image)
        save(tmp_path / "coarse" / f"b{i}.png", coarse)
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "sam_refiner" / "configs" / "inference.json"))
    parser.update({"input_dir": str(tmp_path / "img"), "coarse_dir": str(tmp_path / "coarse"), "batch_size": 2,
                   "num_workers": 0})
    shapes = [tuple(batch["image"].shape) for batch in parser.get_parsed_content("dataloader")]
    assert sorted(shapes) == [(1, 2, 70, 90), (1, 2, 80, 120), (2, 2, 96, 128)]


class _MatmulDtypes(TorchDispatchMode):
    """The input dtypes of the convolutions and matrix products dispatched."""

    OPS = ("convolution", "mm", "addmm", "bmm", "linear", "mkldnn")

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(k in func.__name__ for k in self.OPS) and args and isinstance(args[0], torch.Tensor):
            self.dtypes.add(args[0].dtype)
        return func(*args, **(kwargs or {}))


class _OpCount(TorchDispatchMode):
    """ATen operations dispatched (on a GPU each one is a launch the host pays for)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


DISTINCT = [(96, 128), (80, 120), (70, 90), (64, 100)]  # BUSI: 639 sizes among 780 images
# operations each further image may add: its encoder-frame normalisation and its resizes, thresholds and copies;
# a prompt and decoder pass of its own would add hundreds (the component-labelling loop alone is H + W steps)
PER_IMAGE = 60


def _count(run) -> tuple[int, int]:
    """(ATen operations, SAMRefiner.decode calls) of ``run()``."""
    calls = []
    decode = SAMRefiner.decode

    def counted(self, *args, **kwargs):
        calls.append(1)
        return decode(self, *args, **kwargs)

    SAMRefiner.decode = counted
    try:
        with _OpCount() as ops:
            run()
    finally:
        SAMRefiner.decode = decode
    return ops.n, len(calls)


@pytest.mark.parametrize("box_source", ["largest", "components"])
def test_refine_decodes_a_batch_of_any_sizes_in_one_pass(box_source):
    """``refine``: a batch of four sizes costs about what one image costs (per image only the resizes), not four
    prompt/decoder passes: on a GPU each pass is about a thousand launches (benchmarks/count_step_ops.py)."""
    refiner = _tiny_refiner()
    refiner.prompt_generator.box_source = box_source
    samples = [_sample(refiner, *_scene(h, w, i)) for i, (h, w) in enumerate(DISTINCT)]
    runner = engine.BatchRefiner(refiner, torch.device("cpu"), optimize="none")
    runner.probabilities(samples[:1])  # first call: lazy state
    one, one_calls = _count(lambda: runner.probabilities(samples[:1]))
    four, four_calls = _count(lambda: runner.probabilities(samples))
    assert one_calls == four_calls == 1
    assert four < one + PER_IMAGE * (len(DISTINCT) - 1), (one, four)


def test_predict_decodes_a_batch_of_any_sizes_in_one_pass_and_equals_refine():
    """``predict`` (no iterations, the default): one prompt/decoder pass for four sizes; each image's outputs equal
    ``refine`` on that image alone, with the quality gate."""
    from test_predict import NETWORK_KWARGS

    from ultrarefiner.engines.inference.ultra_predict import UltraPredictor, refine
    from ultrarefiner.engines.training.e2e_setup import build_ultrarefiner

    torch.manual_seed(0)
    model = build_ultrarefiner(NETWORK_KWARGS, cache_embeddings=False).eval()
    predictor = UltraPredictor(model, "cpu", quality_gate=True, gate_threshold=0.6, optimize="none")
    images = [_scene(h, w, i)[0] for i, (h, w) in enumerate(DISTINCT)]
    samples = [predictor.dataset.sample(im) for im in images]
    predictor.predict_batch(samples[:1])
    one, one_calls = _count(lambda: predictor.predict_batch(samples[:1]))
    got = []
    four, four_calls = _count(lambda: got.extend(predictor.predict_batch(samples)))
    assert one_calls == four_calls == 1
    assert four < one + PER_IMAGE * (len(DISTINCT) - 1), (one, four)
    for image, g in zip(images, got, strict=True):
        native = torch.from_numpy(image)[None, None]
        small = torch.as_tensor(predictor.transform(native[0].float()), dtype=torch.float32)[None].clamp(0, 1)
        ref = refine(model, small, native, quality_gate=True, gate_threshold=0.6)
        assert g["refined"].shape == image.shape
        assert np.allclose(g["refined"], ref["final"][0, 0].numpy(), atol=1e-4)
        assert np.allclose(g["coarse"], ref["coarse"][0, 0].numpy(), atol=1e-5)
        assert g["pred_iou"] == pytest.approx(float(ref["pred_iou"][0]), abs=1e-5)
        assert g["gated"] == bool(ref["gate"][0] > 0)


def test_predict_iterations_decode_a_batch_of_any_sizes_once_per_pass():
    """``predict --iterations 2``: each pass prompts with every image's refined mask at its own size, one decoder
    pass for the batch's four sizes (3 in all, not 3 per size); each image equals ``refine`` on it alone."""
    from test_predict import NETWORK_KWARGS

    from ultrarefiner.engines.inference.ultra_predict import UltraPredictor, refine
    from ultrarefiner.engines.training.e2e_setup import build_ultrarefiner

    torch.manual_seed(0)
    model = build_ultrarefiner(NETWORK_KWARGS, cache_embeddings=False).eval()
    predictor = UltraPredictor(model, "cpu", iterations=2, quality_gate=True, gate_threshold=0.6, optimize="none")
    images = [_scene(h, w, i)[0] for i, (h, w) in enumerate(DISTINCT)]
    got = []
    _, calls = _count(lambda: got.extend(predictor.predict_batch([predictor.dataset.sample(im) for im in images])))
    assert calls == 3
    for image, g in zip(images, got, strict=True):
        native = torch.from_numpy(image)[None, None]
        small = torch.as_tensor(predictor.transform(native[0].float()), dtype=torch.float32)[None].clamp(0, 1)
        ref = refine(model, small, native, iterations=2, quality_gate=True, gate_threshold=0.6)
        assert np.allclose(g["refined"], ref["final"][0, 0].numpy(), atol=1e-4)
        assert g["best_pass"] == int(ref["best_pass"][0]) and g["gated"] == bool(ref["gate"][0] > 0)
        assert g["final_iou"] == pytest.approx(float(ref["final_iou"][0]), abs=1e-5)


@pytest.mark.parametrize("mode", ["sam", "medsam", "litemedsam"])
def test_forward_sizes_equals_forward_per_image(mode):
    """``SAMRefiner.forward_sizes``: per-image prompts, mask prompt and output size in one batch, in every
    geometry (the padded ones place each size's content differently)."""
    refiner = (SAMRefiner() if mode == "litemedsam"  # LiteMedSAM's geometry needs its TinyViT encoder
               else SAMRefiner(build_tiny_sam(img_size=64), checkpoint=None, preprocessing=mode)).eval()
    sizes = [*DISTINCT, DISTINCT[1]]  # a size twice: grouped in the mask prompt and the final resize
    torch.manual_seed(0)
    emb = torch.randn(len(sizes), refiner.sam.prompt_encoder.embed_dim,
                      *refiner.sam.prompt_encoder.image_embedding_size)
    coarse = torch.stack([torch.from_numpy(_scene(56, 56, i)[1]).float()[None] / 255 for i in range(len(sizes))])
    with torch.no_grad():
        out = refiner.forward_sizes(emb, coarse, sizes)
        for i, s in enumerate(sizes):
            ref = refiner(image_embeddings=emb[i : i + 1], coarse=coarse[i : i + 1], original_size=s)
            assert out["masks"][i].shape == (1, *s)
            torch.testing.assert_close(out["masks"][i], ref["masks"][0], atol=1e-4, rtol=0)
            torch.testing.assert_close(out["iou_predictions"][i], ref["iou_predictions"][0], atol=1e-5, rtol=0)
            torch.testing.assert_close(out["prompts"]["boxes"][i], ref["prompts"]["boxes"][0], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="4 sizes for 5"):
        refiner.forward_sizes(emb, coarse, DISTINCT)


@pytest.mark.parametrize("iterations", [0, 1])
def test_phase3_validation_batch_of_sizes_equals_batch_one(tmp_path, monkeypatch, iterations):
    """The ultrarefiner bundle's validation takes uncollated batches of native images of different sizes (one
    encoder, TransUNet and decoder pass per batch, the encoder frames resized by the data workers): per image the
    outputs, the metrics and the report equal those of batch 1 through MONAI's collate and decollate; the embeddings
    are cached under the image files' keys."""
    import csv

    from ignite.engine import Events
    from test_predict import NETWORK_KWARGS

    from ultrarefiner.engines.evaluation.engine_fields import output_items
    from ultrarefiner.engines.training.bundle_engines import bundle_evaluator
    from ultrarefiner.engines.training.e2e_setup import build_ultrarefiner
    from ultrarefiner.networks.sam_geometry import SamGeometry

    torch.manual_seed(0)
    model = build_ultrarefiner(NETWORK_KWARGS, cache_embeddings=True).eval()
    items = []
    for i, (h, w) in enumerate([*SIZES, (64, 100)]):
        image, _ = _scene(h, w, i)
        label = blob(h, w, cy=h // 2 - 5, cx=w // 3, r=min(h, w) // 4)
        items.append({"image": str(save(tmp_path / f"img{i}.png", image)),
                      "label": str(save(tmp_path / f"lab{i}.png", label)), "dataset": "BUSI"})

    def validate(name: str, overrides: dict) -> tuple:
        evaluator = bundle_evaluator("ultrarefiner", {
            "device": "$torch.device('cpu')", "amp": False, "num_workers": 0, "cache": "none", "network_def": model,
            "network": model, "img_size": NETWORK_KWARGS["transunet"]["img_size"], "validate#datalist": items,
            "output_dir": str(tmp_path / name), "iterations": iterations, "quality_gate": True, **overrides})
        outputs, batches = [], []
        evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: (
            outputs.extend(output_items(e.state.output)), batches.append(len(output_items(e.state.output)))))
        evaluator.run()
        with open(tmp_path / name / "val_report" / "metrics.csv") as f:
            return outputs, batches, dict(evaluator.state.metrics), list(csv.DictReader(f))

    one = validate("one", {"val_batch_size": 1, "validate#evaluator#decollate": True,
                           "validate#dataloader#collate_fn": "$monai.data.utils.list_data_collate"})
    stats = model.cache_stats()
    assert stats == {"hits": 0, "misses": len(items)}
    model.refresh_cache()  # the batched run encodes again, from the frames the data workers resized
    native_resizes = []
    preprocess = SamGeometry.preprocess_image
    monkeypatch.setattr(SamGeometry, "preprocess_image", lambda self, image, resized=False: (
        native_resizes.append(not resized), preprocess(self, image, resized))[1])
    batched = validate("batched", {"val_batch_size": 3})
    monkeypatch.undo()
    assert native_resizes == [False] * len(items)  # the main process only normalised and padded
    assert one[1] == [1] * len(items) and batched[1] == [3, 2]
    assert model.cache_stats() == {"hits": 0, "misses": 2 * len(items)}
    validate("again", {"val_batch_size": 3})
    assert model.cache_stats() == {"hits": len(items), "misses": 2 * len(items)}  # keyed by the image files
    for a, b in zip(one[0], batched[0], strict=True):
        keys = {"image", "label", "pred", "coarse", "refined", "gated", "gate", "pred_iou"}
        keys |= {"iterative", "best_pass"} if iterations else set()
        assert keys <= a.keys() and keys <= b.keys()
        for k in keys:  # MONAI's decollate turns batch 1's scalars into Python numbers; the batch keeps tensors
            got, ref = torch.as_tensor(b[k]).float(), torch.as_tensor(a[k]).float()
            assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-4), k
    assert one[2].keys() == batched[2].keys()
    assert all(batched[2][k] == pytest.approx(v, abs=1e-4) for k, v in one[2].items())
    assert [r["image"] for r in one[3]] == [r["image"] for r in batched[3]]
    for r1, r3 in zip(one[3], batched[3], strict=True):
        assert r1["height"] == r3["height"] and r1["width"] == r3["width"]
        assert float(r3["refined_dice"]) == pytest.approx(float(r1["refined_dice"]), abs=1e-3)


@pytest.mark.parametrize("setting", ["cache", "no_cache_components"])
def test_phase2_validation_batch_of_sizes_equals_batch_one(tmp_path, setting):
    """The sam_refiner bundle's validation takes uncollated batches of native-frame samples of different sizes (prompts
    per image from its native coarse mask, one decoder pass; per image with component prompts): per sample the
    outputs, the metrics and the report equal those of batch 1 through MONAI's collate and decollate."""
    import csv

    from ignite.engine import Events

    from ultrarefiner.data.refiner_data import SimulatedCoarseDataset
    from ultrarefiner.engines.evaluation.engine_fields import output_items
    from ultrarefiner.engines.evaluation.refiner_evaluation import RefinerReport
    from ultrarefiner.engines.training.bundle_engines import bundle_evaluator
    from ultrarefiner.networks.embedding_cache import EmbeddingCache

    refiner = SAMRefiner(build_tiny_sam(img_size=256, encoder_depth=1, seed=0), preprocessing="sam",
                         box_source="components" if setting == "no_cache_components" else "largest").eval()
    items = []
    for i, (h, w) in enumerate([*SIZES, (64, 100)]):
        image, _ = _scene(h, w, i)
        label = blob(h, w, cy=h // 2 - 5, cx=w // 3, r=min(h, w) // 4)
        items.append({"image": str(save(tmp_path / f"img{i}.png", image)),
                      "label": str(save(tmp_path / f"lab{i}.png", label)), "dataset": "BUSI", "class": "benign"})
    cache = EmbeddingCache(refiner.sam.image_encoder) if setting == "cache" else None
    dataset = SimulatedCoarseDataset(items, None, refiner.geometry, frame="native", flip_prob=0.0, seed=3,
                                     with_image=cache is None, check_leakage=False)

    def validate(name: str, overrides: dict) -> tuple:
        report = RefinerReport(tmp_path / name, n_overlays=1, n_bootstrap=10)
        evaluator = bundle_evaluator("sam_refiner", {
            "device": "$torch.device('cpu')", "amp": False, "num_workers": 0, "network": refiner, "cache": cache,
            "validate#dataset": dataset, "validate#handlers": [report], **overrides})
        outputs, batches = [], []
        evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: (
            outputs.extend(output_items(e.state.output)), batches.append(len(output_items(e.state.output)))))
        evaluator.run()
        with open(tmp_path / name / "metrics.csv") as f:
            return outputs, batches, dict(evaluator.state.metrics), list(csv.DictReader(f))

    one = validate("one", {"val_batch_size": 1, "validate#evaluator#decollate": True,
                           "validate#dataloader#collate_fn": "$monai.data.utils.list_data_collate"})
    batched = validate("batched", {"val_batch_size": 3})
    assert one[1] == [1] * len(items) and batched[1] == [3, 2]
    for a, b in zip(one[0], batched[0], strict=True):
        assert a["image_key"] == b["image_key"]
        for k in ("label", "pred", "coarse", "input_dice", "iou_predictions", "image"):
            got, ref = torch.as_tensor(b[k]).float(), torch.as_tensor(a[k]).float()
            assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-4), k
        assert b["image"].shape == b["label"].shape  # the native image, for the overlays (NativeImaged)
    assert one[2].keys() == batched[2].keys()
    assert all(batched[2][k] == pytest.approx(v, abs=1e-4) for k, v in one[2].items())
    for r1, r3 in zip(one[3], batched[3], strict=True):
        assert (r1["image"], r1["height"], r1["width"]) == (r3["image"], r3["height"], r3["width"])
        assert float(r3["refined_dice"]) == pytest.approx(float(r1["refined_dice"]), abs=1e-3)
        assert float(r3["input_dice"]) == pytest.approx(float(r1["input_dice"]), abs=1e-6)
