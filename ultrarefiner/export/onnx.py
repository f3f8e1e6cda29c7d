"""ONNX export of TransUNet and of the SAM refiner, through MONAI's ``convert_to_onnx`` (torch's dynamo exporter).

TransUNet is one graph: ``image`` (B,1,S,S) in [0,1] -> ``logits`` (B,num_classes,S,S), as ``network_def`` takes it.

The refiner is two graphs, as segment-anything's own ONNX export splits SAM (``scripts/export_onnx_model.py``
exports the prompt encoder + mask decoder; the image encoder runs once per image, the decoder once per prompt):

- ``refiner_image_encoder.onnx``: ``encoder_input`` (B,3,S,S), the output of ``SAMRefiner.preprocess_image`` (the
  checkpoint's resize, intensity scaling and padding, done outside the graph: its exact resize is OpenCV/SciPy on
  uint8) -> ``image_embeddings`` (B,256,S/16,S/16). S = 256 for LiteMedSAM, 1024 for vit_b.
- ``refiner_decoder.onnx``: ``SAMRefiner.decode`` (prompt encoder + mask decoder) on ``image_embeddings`` and the
  refiner's prompts in the encoder frame: ``boxes`` (B,4) x0,y0,x1,y1 (with box prompts, the default),
  ``point_coords`` (B,N,2) and ``point_labels`` (B,N) (with point prompts), ``mask_input`` (B,1,L,L) mask-prompt
  logits (with the mask prompt, the default) -> ``low_res_logits`` (B,K,L,L) and ``iou_predictions`` (B,K), K = 1
  for MedSAM/LiteMedSAM. ``decoder_inputs`` computes these inputs from a coarse mask (the refiner's own prompt
  code); ``SAMRefiner.geometry.postprocess_masks`` maps the logits back to the image.

Unlike segment-anything's export, the decoder keeps the refiner's prompt layout (which prompts exist is fixed at
export) instead of SAM's point-label encoding, so its outputs equal ``SAMRefiner.decode``'s.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ultrarefiner.utils.io import atomic_write, write_json

__all__ = [
    "RefinerDecoder",
    "RefinerImageEncoder",
    "compare_onnx",
    "decoder_inputs",
    "export_onnx",
    "export_refiner_onnx",
    "export_transunet_onnx",
    "report_file",
    "symbolic_batch",
]

logger = logging.getLogger(__name__)

TRANSUNET_FILE = "transunet.onnx"
ENCODER_FILE = "refiner_image_encoder.onnx"
DECODER_FILE = "refiner_decoder.onnx"


def report_file(kind: str) -> str:
    """Name of the export's description (inputs, outputs, measured differences) beside the .onnx files."""
    return f"onnx_export_{kind}.json"


class RefinerImageEncoder(nn.Module):
    """The refiner's image encoder (LoRA adapters included): (B,3,S,S) encoder input -> (B,C,S/16,S/16)."""

    def __init__(self, refiner: nn.Module) -> None:
        super().__init__()
        self.encoder = refiner.sam.image_encoder
        self.img_size = int(refiner.geometry.img_size)

    def forward(self, encoder_input: torch.Tensor) -> torch.Tensor:
        return self.encoder(encoder_input)


@contextlib.contextmanager
def symbolic_batch(module: nn.Module) -> Iterator[None]:
    """While exporting: TinyViT's ``PatchMerging`` (LiteMedSAM's encoder) reshapes token inputs with
    ``B = len(x)``, a Python int that pins the batch size in any traced graph; here the reshape uses ``x.shape[0]``
    and the original forward does the rest (its 4-D path). Restored on exit."""
    patched = []
    for sub in module.modules():
        if type(sub).__name__ == "PatchMerging" and hasattr(sub, "input_resolution"):
            original = sub.forward

            def forward(x: torch.Tensor, _sub: nn.Module = sub, _original=original) -> torch.Tensor:
                if x.ndim == 3:
                    h, w = _sub.input_resolution
                    x = x.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
                return _original(x)

            sub.forward = forward
            patched.append(sub)
    try:
        yield
    finally:
        for sub in patched:
            del sub.forward  # back to the class's method


class RefinerDecoder(nn.Module):
    """``SAMRefiner.decode`` with prompts already in the encoder frame (S x S), as one graph.

    ``decode`` maps prompts from the original image frame with the geometry's scale; an S x S original frame has
    scale 1, so the graph is ``decode`` itself: the prompt encoder and the (batched) mask decoder of the refiner.
    """

    def __init__(self, refiner: nn.Module) -> None:
        super().__init__()
        self.refiner = refiner
        gen = refiner.prompt_generator
        self.frame = (int(refiner.geometry.img_size),) * 2
        names = []
        if gen.use_box_prompt:
            names.append("boxes")
        if gen.use_point_prompt:
            names += ["point_coords", "point_labels"]
        if refiner.use_mask_prompt:
            names.append("mask_input")
        if not names:
            raise ValueError("the refiner uses no prompt: nothing to export for its decoder")
        self.prompt_names = tuple(names)

    def forward(self, image_embeddings: torch.Tensor, *prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        given = dict(zip(self.prompt_names, prompts, strict=True))
        full: dict[str, torch.Tensor | None] = {k: given.get(k) for k in
                                                ("boxes", "point_coords", "point_labels", "mask_input")}
        return self.refiner.decode(image_embeddings, full, self.frame)


@torch.no_grad()
def decoder_inputs(refiner: nn.Module, coarse: torch.Tensor, original_size: Sequence[int]) -> dict[str, torch.Tensor]:
    """The decoder graph's prompt inputs for coarse masks, computed by the refiner's own prompt code.

    Arguments:
      refiner: the exported ``SAMRefiner``.
      coarse: (B,1,h,w) soft coarse masks in [0,1] covering the images (any resolution).
      original_size: (H, W) of the images.

    Returns:
      dict: the ``RefinerDecoder.prompt_names`` entries (boxes/points in the encoder frame, float32).
    """
    size = (int(original_size[0]), int(original_size[1]))
    prompts = refiner.make_prompts(coarse.float(), size)
    geometry = refiner.geometry
    out = {}
    if prompts.get("boxes") is not None:
        out["boxes"] = geometry.transform_boxes(prompts["boxes"], size).float()
    if prompts.get("point_coords") is not None:
        out["point_coords"] = geometry.transform_coords(prompts["point_coords"], size).float()
        out["point_labels"] = prompts["point_labels"].float()
    if prompts.get("mask_input") is not None:
        out["mask_input"] = prompts["mask_input"].float()
    return out


def _dynamic_batch(module: nn.Module, names: Sequence[str]) -> dict[str, Any]:
    """``dynamic_shapes`` with the batch (dim 0) of every input free, keyed by the forward's parameter names."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    import inspect

    params = list(inspect.signature(module.forward).parameters.values())
    if any(p.kind is p.VAR_POSITIONAL for p in params):  # RefinerDecoder: (image_embeddings, *prompts)
        return {params[0].name: {0: batch}, params[1].name: tuple({0: batch} for _ in names[1:])}
    return {p.name: {0: batch} for p in params}


def _export(module: nn.Module, inputs: Sequence[torch.Tensor], input_names: Sequence[str],
            output_names: Sequence[str], path: Path, opset: int | None) -> Path:
    from monai.networks.utils import convert_to_onnx

    if inputs[0].shape[0] < 2:  # torch.export specialises size-1 dimensions: the graph would fix the batch at 1
        raise ValueError(f"export with a batch of at least 2 example inputs, got {inputs[0].shape[0]}")

    import onnx

    module = module.eval()

    def write(tmp: str) -> None:  # checked before it replaces a previous export: a failed one leaves that whole
        convert_to_onnx(module, list(inputs), input_names=list(input_names), output_names=list(output_names),
                        opset_version=opset, filename=tmp, dynamo=True, external_data=False,
                        dynamic_shapes=_dynamic_batch(module, input_names), verify=False)
        # torch's exporter may fall back to a graph that fixed the batch (code taking a Python int of it): refused
        graph = onnx.load(tmp, load_external_data=False).graph
        fixed = [i.name for i in graph.input if not i.type.tensor_type.shape.dim[0].dim_param]
        if fixed:
            raise RuntimeError(f"{path}: the batch axis of {fixed} was fixed during export (dynamic batch expected)")

    return atomic_write(path, write)


def compare_onnx(module: nn.Module, path: str | os.PathLike, inputs: Mapping[str, torch.Tensor],
                 repeats: int = 0) -> dict[str, Any]:
    """Runs the ONNX file with onnxruntime on CPU and ``module`` with PyTorch on the same inputs.

    Returns:
      dict: ``max_abs_diff`` per output name and overall, and with ``repeats`` > 0 the median latency in ms of
      onnxruntime and of PyTorch (CPU, onnxruntime given PyTorch's number of threads).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same threads as PyTorch, for the latencies
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {k: v.detach().cpu().numpy() for k, v in inputs.items()}
    got = session.run(None, feed)
    module = module.eval().cpu()
    with torch.no_grad():
        ref = module(*[inputs[k].cpu() for k in feed])
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    names = [o.name for o in session.get_outputs()]
    diffs = {n: float(np.abs(g - r.numpy()).max()) for n, g, r in zip(names, got, ref, strict=True)}
    report: dict[str, Any] = {"max_abs_diff": max(diffs.values()), "max_abs_diff_per_output": diffs,
                              "shapes": {n: list(g.shape) for n, g in zip(names, got, strict=True)}}
    if repeats > 0:
        def median_ms(fn) -> float:
            fn()  # warm-up
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1000)
            return float(np.median(times))

        with torch.no_grad():
            report["onnxruntime_ms"] = median_ms(lambda: session.run(None, feed))
            report["torch_ms"] = median_ms(lambda: module(*[inputs[k].cpu() for k in feed]))
    return report


def export_transunet_onnx(network: nn.Module, output_dir: str | os.PathLike, batch_size: int = 2,
                          opset: int | None = None, verify: bool = True, seed: int = 0) -> dict[str, Any]:
    """Exports a ``TransUNet`` to ``<output_dir>/transunet.onnx`` (dynamic batch).

    Returns:
      dict: the file, its input/output names and shapes, and with ``verify`` the onnxruntime-vs-PyTorch comparison
      on random images of ``batch_size`` (``compare_onnx``).
    """
    network = network.eval().cpu()
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch_size, network.in_channels, network.img_size, network.img_size, generator=g)
    path = _export(network, [image], ["image"], ["logits"], Path(output_dir) / TRANSUNET_FILE, opset)
    out: dict[str, Any] = {"file": str(path), "inputs": {"image": ["batch", network.in_channels, network.img_size,
                                                                   network.img_size]},
                           "outputs": {"logits": ["batch", network.num_classes, network.img_size, network.img_size]},
                           "note": "image: intensities in [0, 1]; softmax over dim 1 gives the probabilities"}
    if verify:
        out["verification"] = compare_onnx(network, path, {"image": image})
    return out


def _example_prompts(refiner: nn.Module, batch_size: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A synthetic image and elliptic coarse masks (different per sample) -> encoder input and decoder prompts."""
    g = torch.Generator().manual_seed(seed)
    h, w = 96, 128
    image = torch.rand(batch_size, 1, h, w, generator=g) * 255
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    masks = []
    for i in range(batch_size):
        cy, cx = h * (0.35 + 0.3 * torch.rand(1, generator=g)), w * (0.35 + 0.3 * torch.rand(1, generator=g))
        ry, rx = h * 0.15 + 4 * i, w * 0.12 + 3 * i
        d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        masks.append(torch.sigmoid(4 * (1 - d)))
    coarse = torch.stack(masks)[:, None]
    encoder_input = refiner.preprocess_image(image).float()
    return encoder_input, decoder_inputs(refiner, coarse, (h, w))


def export_refiner_onnx(refiner: nn.Module, output_dir: str | os.PathLike, batch_size: int = 2,
                        opset: int | None = None, verify: bool = True, seed: int = 0) -> dict[str, Any]:
    """Exports a ``SAMRefiner`` as ``refiner_image_encoder.onnx`` and ``refiner_decoder.onnx`` (dynamic batch).

    Returns:
      dict per graph: the file, input/output names and shapes, and with ``verify`` the onnxruntime-vs-PyTorch
      comparison (``compare_onnx``) on a synthetic image and elliptic coarse masks.
    """
    refiner = refiner.eval().cpu()
    encoder, decoder = RefinerImageEncoder(refiner), RefinerDecoder(refiner)
    encoder_input, prompts = _example_prompts(refiner, batch_size, seed)
    with torch.no_grad():
        embeddings = encoder(encoder_input)
    out_dir = Path(output_dir)
    with symbolic_batch(encoder):
        enc_path = _export(encoder, [encoder_input], ["encoder_input"], ["image_embeddings"],
                           out_dir / ENCODER_FILE, opset)
    dec_names = ["image_embeddings", *decoder.prompt_names]
    dec_inputs = {"image_embeddings": embeddings, **{k: prompts[k] for k in decoder.prompt_names}}
    dec_path = _export(decoder, list(dec_inputs.values()), dec_names, ["low_res_logits", "iou_predictions"],
                       out_dir / DECODER_FILE, opset)
    s, low = encoder.img_size, int(refiner.geometry.low_res_size)
    emb = ["batch", *embeddings.shape[1:]]
    shapes = {"boxes": ["batch", 4], "point_coords": ["batch", "n", 2], "point_labels": ["batch", "n"],
              "mask_input": ["batch", 1, low, low]}
    k = 1 if not refiner.multimask_output else 3
    out: dict[str, Any] = {
        "preprocessing": refiner.preprocessing,
        "encoder": {"file": str(enc_path), "inputs": {"encoder_input": ["batch", 3, s, s]},
                    "outputs": {"image_embeddings": emb},
                    "note": "encoder_input = SAMRefiner.preprocess_image(image 0-255, native size)"},
        "decoder": {"file": str(dec_path),
                    "inputs": {"image_embeddings": emb, **{n: shapes[n] for n in decoder.prompt_names}},
                    "outputs": {"low_res_logits": ["batch", k, low, low], "iou_predictions": ["batch", k]},
                    "note": "prompts in the encoder frame: ultrarefiner.export.onnx.decoder_inputs(refiner, coarse, "
                            "(H, W)); masks: refiner.geometry.postprocess_masks(low_res_logits, (H, W)) > 0"},
    }
    if verify:
        out["encoder"]["verification"] = compare_onnx(encoder, enc_path, {"encoder_input": encoder_input})
        out["decoder"]["verification"] = compare_onnx(decoder, dec_path, dec_inputs)
    return out


def export_onnx(kind: str, network: nn.Module, output_dir: str | os.PathLike, batch_size: int = 2,
                opset: int | None = None, verify: bool = True) -> dict[str, Any]:
    """``export_transunet_onnx`` or ``export_refiner_onnx`` by ``kind``; also writes
    ``<output_dir>/onnx_export_<kind>.json`` (the returned report)."""
    if kind == "transunet":
        report = {"kind": kind, "transunet": export_transunet_onnx(network, output_dir, batch_size, opset, verify)}
    elif kind == "refiner":
        report = {"kind": kind, **export_refiner_onnx(network, output_dir, batch_size, opset, verify)}
    else:
        raise ValueError(f"kind must be transunet or refiner, got {kind!r}")
    report["torch"] = torch.__version__
    write_json(Path(output_dir, report_file(kind)), report)
    return report
