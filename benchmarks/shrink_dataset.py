"""Make a smaller copy of a preprocessed dataset (``<root>/<NAME>/datalist.json`` + images + masks) for transport.

    python benchmarks/shrink_dataset.py --src ./dataset/processed --dst ./.busi_small --name BUSI --max_side 512

The GPU machine that produced the bundle READMEs' real-run numbers accepts at most 64 MiB of carried files; native
BUSI PNGs are ~88 MB. Images whose longest side exceeds ``--max_side`` are shrunk (area averaging) and every image is
stored as JPEG (``--quality``); masks are resized with nearest neighbour and stay PNG. Splits, folds and groups are
kept exactly (the datalist is copied with only paths and sizes changed), so fold 0 here is fold 0 of the original.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from PIL import Image


def shrink(src: Path, dst: Path, max_side: int, quality: int) -> dict:
    """Shrink every item of ``src/datalist.json`` into ``dst``; returns the new datalist."""
    datalist = json.loads((src / "datalist.json").read_text())
    (dst / "images").mkdir(parents=True, exist_ok=True)
    (dst / "masks").mkdir(parents=True, exist_ok=True)
    for split in ("training", "testing"):
        for item in datalist.get(split, []):
            image = Image.open(src / item["image"]).convert("L")
            mask = Image.open(src / item["label"]).convert("L")
            scale = min(1.0, max_side / max(image.size))
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            if scale < 1.0:
                image = image.resize(size, Image.Resampling.BOX)
                mask = mask.resize(size, Image.Resampling.NEAREST)
            stem = Path(item["image"]).stem
            item["image"], item["label"] = f"images/{stem}.jpg", f"masks/{stem}.png"
            image.save(dst / item["image"], quality=quality)
            mask.save(dst / item["label"], optimize=True)
            item["width"], item["height"] = size
    tmp = dst / "datalist.json.tmp"
    tmp.write_text(json.dumps(datalist, indent=2))
    os.replace(tmp, dst / "datalist.json")
    return datalist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default="./dataset/processed")
    parser.add_argument("--dst", default="./.busi_small")
    parser.add_argument("--name", default="BUSI")
    parser.add_argument("--max_side", type=int, default=512)
    parser.add_argument("--quality", type=int, default=92)
    args = parser.parse_args()
    datalist = shrink(Path(args.src) / args.name, Path(args.dst) / args.name, args.max_side, args.quality)
    n = sum(len(datalist.get(s, [])) for s in ("training", "testing"))
    print(f"{n} items -> {Path(args.dst) / args.name} (longest side <= {args.max_side}, JPEG q{args.quality})")


if __name__ == "__main__":
    main()
