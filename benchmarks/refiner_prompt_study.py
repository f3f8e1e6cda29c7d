"""Which prompts help a SAM refiner on real coarse masks: input vs refined Dice per prompt rule, on one split.

    python benchmarks/refiner_prompt_study.py --data_root ./dataset/processed --dataset BUSI --split test \
        --embedding_cache ./checkpoints/prompt_study_emb.pt --output ./checkpoints/prompt_study.json \
        [--checkpoint REFINER.pt] [--coarse_dir PRED_DIR]

Inputs (coarse masks), all at native resolution:
  - ``oracle``: the ground-truth mask itself (what a perfect coarse model gives; the box is then the GT box);
  - ``simulated/<bucket>``: ``--samples_per_image`` SDF failure simulations per image (the phase-2 evaluation
    set of the sam_refiner bundle, fixed by the seed);
  - ``transunet``: masks of another model, ``<coarse_dir>/<stem>.png`` (``--coarse_dir``; binary or probability
    PNG, resized bilinearly to the image's size when it differs, e.g. a model run on a shrunk copy; with
    ``--coarse_only`` only the images that have such a mask are studied).

Rules, each a ``SAMRefiner`` setting on the same weights (LiteMedSAM packaged, or ``--checkpoint``):
  box of the whole mask / of its largest component, + positive point, + mask prompt, single vs multimask output,
  and ``box_source="components"``: one prompt set per connected component (area >= ``--min_component`` of the
  image, at most ``--max_components``), decoded in one batch and merged (the refiner's own option).

``--multi_lesion_raw RAW`` keeps only the images whose raw BUSI mask came in several files (``<stem>_mask_1.png``
under RAW: 17 images in BUSI); ``--split all`` studies the training folds and the test split together (with
``oracle`` and ``simulated`` inputs, the model-free ones, every image is unseen by the refiner's weights only when
it is a zero-shot LiteMedSAM or the split is held out).

Image embeddings are computed once per image and kept in ``--embedding_cache`` (the encoder is frozen), so the
study runs on a CPU. Prints one table (mean Dice per input kind and rule) and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from ultrarefiner.data.datalist import datalist_path, load_split
from ultrarefiner.data.imaging import read_image, read_label
from ultrarefiner.data.refiner_data import SimulatedCoarseDataset
from ultrarefiner.engines.checkpoints.refiner_checkpoint import load_refiner_checkpoint
from ultrarefiner.networks import SAMRefiner, build_sam

RULES = {
    "box(whole)": dict(use_point_prompt=False, use_mask_prompt=False, box_source="whole"),
    "box(largest)": dict(use_point_prompt=False, use_mask_prompt=False, box_source="largest"),
    "box+point": dict(use_point_prompt=True, use_mask_prompt=False, box_source="largest"),
    "box+mask": dict(use_point_prompt=False, use_mask_prompt=True, box_source="largest"),
    "box+point+mask": dict(use_point_prompt=True, use_mask_prompt=True, box_source="largest"),
    "box(largest) multimask": dict(use_point_prompt=False, use_mask_prompt=False, box_source="largest",
                                   multimask_output=True),
    "components": dict(use_point_prompt=False, use_mask_prompt=False, box_source="components"),
    "components+mask": dict(use_point_prompt=False, use_mask_prompt=True, box_source="components"),
}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2.0 * np.logical_and(a, b).sum() / s)


def is_multi_lesion(item: dict, raw_root: str) -> bool:
    """The raw image has a second mask file (BUSI's ``<stem>_mask_1.png``): several lesions, merged by preprocess."""
    src = Path(raw_root) / item["source"]
    if not src.is_file():
        src = Path(raw_root) / Path(item["source"]).relative_to(Path(item["source"]).parts[0])
    return src.with_name(f"{src.stem}_mask_1.png").is_file()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", required=True)
    p.add_argument("--dataset", default="BUSI")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--split", default="test", help="train, val, trainval, test or all (trainval + test)")
    p.add_argument("--multi_lesion_raw", default="", help="raw BUSI root: only images with several mask files")
    p.add_argument("--samples_per_image", type=int, default=3)
    p.add_argument("--checkpoint", default="", help="phase-2 refiner checkpoint (default: LiteMedSAM zero-shot)")
    p.add_argument("--coarse_dir", default="", help="folder of another model's masks <stem>.png")
    p.add_argument("--coarse_only", action="store_true", help="only images with a mask in --coarse_dir")
    p.add_argument("--no_simulated", action="store_true", help="skip the simulated failures")
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--min_component", type=float, default=0.001)
    p.add_argument("--max_components", type=int, default=4)
    p.add_argument("--limit", type=int, default=0, help="first N images only (0: all)")
    p.add_argument("--embedding_cache", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_grad_enabled(False)

    datalist = datalist_path(a.data_root, a.dataset)
    splits = ["trainval", "test"] if a.split == "all" else [a.split]
    items = [dict(it, image=os.path.realpath(it["image"]), label=os.path.realpath(it["label"]), split=split)
             for split in splits for it in load_split(datalist, a.fold, split) if it.get("class") != "normal"]
    if a.multi_lesion_raw:
        items = [it for it in items if is_multi_lesion(it, a.multi_lesion_raw)]
    if a.coarse_only:
        items = [it for it in items if (Path(a.coarse_dir) / f"{Path(it['image']).stem}.png").is_file()]
    if a.limit:
        items = items[: a.limit]
    sam = build_sam("lite_medsam", "packaged")
    rules = {name: RULES[name] for name in a.rules.split(",")}
    refiners = {name: SAMRefiner(sam=sam, checkpoint=None, max_components=a.max_components,
                                 min_component=a.min_component, **kw).eval() for name, kw in rules.items()}
    if a.checkpoint:
        for r in refiners.values():
            load_refiner_checkpoint(r, a.checkpoint)  # same sam object: loading once would do, all stay in sync
    any_ref = next(iter(refiners.values()))

    cache: dict[str, torch.Tensor] = torch.load(a.embedding_cache) if os.path.isfile(a.embedding_cache) else {}
    t0 = time.time()
    for i, it in enumerate(items):
        if it["image"] not in cache:
            img = torch.from_numpy(read_image(it["image"]))[None, None].float()
            cache[it["image"]] = any_ref.encode_image(img).half()
            if i % 16 == 15:
                torch.save(cache, a.embedding_cache)
                print(f"encoded {i + 1}/{len(items)} ({time.time() - t0:.0f} s)", flush=True)
    torch.save(cache, a.embedding_cache)

    samples = []  # (kind, image key, label, coarse)
    for it in items:
        label = read_label(it["label"])
        samples.append(("oracle", it["image"], label, label.astype(np.float32)))
        stem = Path(it["image"]).stem
        if a.coarse_dir and (Path(a.coarse_dir) / f"{stem}.png").is_file():  # another model's mask, where it has one
            cm = read_image(Path(a.coarse_dir) / f"{stem}.png").astype(np.float32) / 255.0
            if cm.shape != label.shape:
                cm = cv2.resize(cm, (label.shape[1], label.shape[0]), interpolation=cv2.INTER_LINEAR)
            samples.append(("transunet", it["image"], label, cm))
    keep = {it["image"] for it in items}
    for split in [] if a.no_simulated else splits:
        if a.multi_lesion_raw:  # simulate on the kept images only (the whole split's set would be mostly skipped)
            sim = SimulatedCoarseDataset([it for it in items if it["split"] == split], None, any_ref.geometry,
                                         frame="native", samples_per_image=a.samples_per_image, flip_prob=0.0,
                                         seed=a.seed, with_image=False, check_leakage=False)
        else:  # the sam_refiner bundle's evaluation set of the split, fixed by the seed
            sim = SimulatedCoarseDataset(load_split(datalist, a.fold, split), None, any_ref.geometry, frame="native",
                                         samples_per_image=a.samples_per_image, flip_prob=0.0, seed=a.seed,
                                         with_image=False, check_leakage=False)
        for k in range(len(sim)):
            s = sim[k]
            key = os.path.realpath(s["source"])
            if key in keep:
                samples.append((f"simulated/{s['bucket']}", key, s["label"][0].numpy() > 0.5,
                                s["coarse"][0].numpy()))
    print(f"{len(samples)} samples on {len(items)} images")

    rows: dict[str, dict[str, list[float]]] = {}
    for kind, key, label, coarse in samples:
        emb = cache[key].float()
        size = label.shape
        res = rows.setdefault(kind, {"input": []})
        res["input"].append(dice(coarse > 0.5, label))
        for name, ref in refiners.items():
            out = ref(image_embeddings=emb, coarse=torch.from_numpy(coarse)[None, None], original_size=size)
            res.setdefault(name, []).append(dice(out["masks"][0, 0].numpy() > 0, label))
    table = {kind: {name: {"dice": float(np.mean(v)), "n": len(v),
                           "improved": int(sum(x > y + 1e-9 for x, y in zip(v, r["input"], strict=True)))}
                    for name, v in r.items()} for kind, r in sorted(rows.items())}
    names = ["input", *rules]
    print("| input | n | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for kind, r in table.items():
        print(f"| {kind} | {r['input']['n']} | " + " | ".join(f"{r[n]['dice']:.3f}" for n in names) + " |")
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{a.output}.tmp"
    with open(tmp, "w") as f:
        json.dump({"checkpoint": a.checkpoint or "LiteMedSAM (packaged, zero-shot)", "split": a.split,
                   "images": len(items), "rules": rules, "table": table,
                   "seconds": round(time.time() - t0, 1)}, f, indent=1)
    os.replace(tmp, a.output)


if __name__ == "__main__":
    main()
