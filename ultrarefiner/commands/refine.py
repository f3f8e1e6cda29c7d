"""``python -m ultrarefiner refine``."""

from __future__ import annotations

from pathlib import Path

from ultrarefiner.commands.args import check_postfix, check_range, data_workers
from ultrarefiner.utils.flags import as_flag


def refine(
    images: str,
    masks: str,
    output_dir: str,
    labels: str | None = None,
    checkpoint: str | list[str] | None = None,
    zero_shot: bool = False,
    batch_size: int | None = None,
    nifti: bool = False,
    device: str = "auto",
    amp: bool = True,
    num_workers: int | None = None,
    writers: int | None = None,
    tta: str = "none",
    optimize: str = "auto",
    box_source: str = "largest",
    mask_postfix: str = "",
    label_postfix: str = "",
    exclude: str | list[str] | None = None,
    mask_classes: str | int | list | tuple | None = None,
    label_classes: str | int | list | tuple | None = None,
) -> None:
    """Refine any segmenter's masks with the SAM refiner: a folder of images plus a folder of coarse masks.

    Images (PNG, JPEG, BMP, TIFF; read as 8-bit grayscale) and coarse masks (binary 0/255 or 0/1, probability*255,
    16-bit probability*65535 as MONAI's SaveImage writes, float probabilities in a TIFF, or 2D NIfTI .nii/.nii.gz
    read x first as SaveImage writes it, also in its folder per image <stem>/<stem>_seg.nii.gz) are matched by file
    stem. Writes <output_dir>/masks/<stem>.png (refined, 0/255, the image's native size; with --nifti also
    <stem>.nii.gz), <output_dir>/overlays/<stem>.png (label green, coarse blue, refined red), report.csv and
    report.json (predicted IoU and mask areas per image; with --labels Dice, IoU, HD95... of coarse and refined
    masks and their paired comparison with a bootstrap 95% CI), progress.jsonl and skipped.csv.
    Re-running the same command resumes: finished images are not refined again. Bad samples (unreadable files, a
    missing, blank or differently sized mask) are listed in skipped.csv; the command fails only when no image could
    be refined.

    Args:
        images: folder of images.
        masks: folder of coarse masks, <stem>.png (or any picture or NIfTI suffix) for each image <stem>.*.
        output_dir: where the outputs go (created).
        labels: optional folder of ground-truth masks (<stem>.png, or .nii.gz) for the metrics.
        checkpoint: phase-2 refiner checkpoint (sam_refiner best.pt or models/model.pt); default: the shipped
            bundles/sam_refiner/models/model.pt. Several files separated by commas (e.g. the five folds' refiners)
            make an ensemble, the mean of their probabilities; refiners sharing LiteMedSAM's frozen encoder share
            its pass, so each extra one adds only a decoder pass (see bundles/sam_refiner/docs/README.md for what
            it gains on BUSI).
        zero_shot: use LiteMedSAM's packaged weights without a refiner checkpoint (not with --checkpoint).
        batch_size: images per encoder, prompt and decoder pass (any sizes: images and coarse masks are resized
            into the encoder's frame, outputs back to each image's size). Default 8 on CUDA, 1 on the CPU (where
            batches of 8 measured slower per image than single images).
        nifti: also write NIfTI (.nii.gz, 0/1) masks.
        device: cpu, cuda, cuda:1 or auto (CUDA when available).
        amp: bfloat16 autocast on CUDA.
        num_workers: data workers reading and checking the files; default 4, at most the cores this process may
            use (more workers than cores only compete with the refiner, and PyTorch warns about them).
        writers: threads writing the masks and overlays (and computing the metrics) while the next batch is
            refined; default one per core, up to 8; 0 writes in the main thread.
        tta: test-time augmentation: none (default) or flip (mean probability of the image and of its left-right
            flip, prompted by the flipped coarse mask and flipped back; twice the compute). A folder refined with
            one setting is not resumed with the other.
        optimize: image-encoder speed option: auto (default: channels_last on CUDA with bf16 autocast; on a CPU
            bf16 where it has native bfloat16 (avx512_bf16/AMX), else jit_freeze), none, channels_last, jit_freeze
            (TorchScript freeze, oneDNN fusion, LiteMedSAM's stem on row slabs that stay in cache; CPU only; 1.02
            images/s on 2 AVX2 cores) or compile (torch.compile with inductor's freezing, 13-35 s of compilation
            first, then 0.91 images/s on those cores), all float32 (the same masks up to rounding); or bf16 (CPU
            encoder in bfloat16, 1.7x faster on 2 cores with native bfloat16, on BUSI's test split the same Dice as
            float32, masks differ in a few pixels). Pass jit_freeze for float32 results on every CPU.
        box_source: largest (default: the box and mask prompt of the coarse mask's largest connected component) or
            components (one prompt set per component above 0.1% of the image, at most 4, merged; for images with
            several lesions; on BUSI it helps multi-lesion images and costs 0.01 Dice over the whole test split,
            see bundles/sam_refiner/docs/README.md).
        mask_postfix: coarse masks are named <image stem><mask_postfix>.* (e.g. _seg for the outputs of MONAI's
            SaveImage and of the Model Zoo's bundles; default none).
        label_postfix: labels are named <image stem><label_postfix>.* (e.g. _mask for BUSI; default none), and
            files named <image stem><label_postfix>_<k>.* (BUSI's _mask_1) are further lesions, merged in.
        exclude: file-name patterns (*, ?, [abc]; any case; several separated by commas) of the images folder's
            files to leave out, e.g. '*_mask*' when it is a BUSI class folder, where the masks lie beside the images
            (without it each mask is listed in skipped.csv as an image without a coarse mask).
        mask_classes: the coarse masks are a multi-class segmenter's label maps (0 background, 1 benign, 2
            malignant, as nnU-Net and MONAI Label save them; grayscale, palette PNG or NIfTI), and these values,
            separated by commas, are lesion (e.g. 1,2); default none (lesion is above half the mask's scale). A folder
            refined with one setting is not resumed with another.
        label_classes: the same for the labels.
    """
    import logging

    from ultrarefiner.engines.inference.refine_folder import PROGRESS, SKIPPED_CSV, format_summary, refine_folder

    if batch_size is not None:
        check_range(batch_size, "batch_size", 1, 1024, integer=True)
    num_workers = data_workers(num_workers, default=4)
    if writers is not None:
        check_range(writers, "writers", 0, 64, integer=True)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    report = refine_folder(
        images,
        masks,
        output_dir,
        labels=labels,
        checkpoint=checkpoint,
        zero_shot=as_flag(zero_shot, "zero_shot"),
        batch_size=None if batch_size is None else int(batch_size),
        nifti=as_flag(nifti, "nifti"),
        device=device,
        amp=as_flag(amp, "amp"),
        num_workers=int(num_workers),
        writers=None if writers is None else int(writers),
        tta=tta,
        optimize=optimize,
        box_source=box_source,
        mask_postfix=check_postfix(mask_postfix, "mask_postfix"),
        label_postfix=check_postfix(label_postfix, "label_postfix"),
        exclude=exclude,
        mask_classes=mask_classes,
        label_classes=label_classes,
    )
    out = Path(output_dir).resolve()
    print(format_summary(report))
    if report["skipped"]:
        print(f"{len(report['skipped'])} sample(s) skipped (listed in {out / SKIPPED_CSV}):")
        for s in report["skipped"][:20]:
            print(f"  {s['stem']}: {s['file']}: {s['reason']}")
        if len(report["skipped"]) > 20:
            print(f"  ... and {len(report['skipped']) - 20} more")
    print(f"refined masks: {out / 'masks'}; report: {out / 'report.csv'}, {out / 'report.json'} "
          f"(progress: {out / PROGRESS})")
