"""What an ensemble of phase-2 refiners (e.g. the five folds') gains over each of its members, and what it costs.

    python benchmarks/refiner_ensemble_study.py --images IMAGES --masks COARSE --labels LABELS \
        --checkpoints fold_0.pt,fold_1.pt,fold_2.pt,fold_3.pt,fold_4.pt --output ensemble_study.json

One pass over the images: ``BatchRefiner.member_probabilities`` runs the shared frozen encoder once per image and
each member's prompt encoder + mask decoder, so every member and the ensemble (mean probability, what
``refine --checkpoint a.pt,b.pt,...`` writes) are scored on exactly the same inputs. The samples are read and
checked by ``refine``'s own rules, so the images it skips (a blank coarse mask, sizes that differ) are left out.
Prints, per metric, each member's and the ensemble's mean and the paired bootstrap 95% CI of ensemble minus each
member; and the cost: seconds in the encoder and in the decoders, and the ensemble's time per image over a single
refiner's, both measured in this run. ``--soup`` also scores one refiner holding the members' mean weights (a
uniform model soup: a single refiner's cost and file size).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ultrarefiner.engines.evaluation.comparison import paired_comparison, summarise
from ultrarefiner.engines.evaluation.folder_evaluation import score_pair
from ultrarefiner.engines.evaluation.metrics import METRIC_NAMES
from ultrarefiner.engines.inference.refine_folder import (
    THRESHOLD,
    BatchRefiner,
    checkpoint_list,
    encoder_input,
    read_samples,
    resolve_refiners,
)
from ultrarefiner.hub import create_model


def weight_average(members: list[torch.nn.Module]) -> torch.nn.Module:
    """A copy of ``members[0]`` holding the mean of the members' floating-point weights (the members share their
    architecture and, as phase-2 refiners of one recipe, their initialisation)."""
    soup = copy.deepcopy(members[0])
    states = [m.state_dict() for m in members]
    # weights the members share (the frozen encoder) are kept bit for bit: a mean of equal floats can move by an
    # ulp, and the soup would then need an encoder pass of its own
    mean = {k: torch.stack([st[k] for st in states]).mean(0)
            if v.is_floating_point() and any(not torch.equal(v, st[k]) for st in states[1:]) else v
            for k, v in states[0].items()}
    soup.load_state_dict(mean)
    return soup.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--masks", type=Path, required=True, help="coarse masks, <stem>.png")
    ap.add_argument("--labels", type=Path, required=True)
    ap.add_argument("--checkpoints", required=True, help="refiner files separated by commas (the members)")
    ap.add_argument("--names", default=None, help="member names separated by commas (default fold_0, fold_1, ...)")
    ap.add_argument("--output", type=Path, required=True, help="JSON with the per-image rows and the summary")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--soup", action="store_true",
                    help="also score one refiner holding the members' mean weights (a uniform 'model soup')")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = resolve_refiners(args.checkpoints)
    names = args.names.split(",") if args.names else [f"fold_{k}" for k in range(len(paths))]
    if len(names) != len(paths):
        raise SystemExit(f"--names has {len(names)} names for {len(checkpoint_list(args.checkpoints))} checkpoints")
    members = [create_model("sam_refiner", p).eval() for p in paths]
    scored = list(names)
    extra = []
    if args.soup:  # one refiner with the members' mean weights: no extra inference cost, one file to ship
        extra, scored = [weight_average(members)], [*names, "soup"]
    runner = BatchRefiner(members + extra, torch.device("cpu"))
    encoder_seconds = 0.0

    def timed(encoder):
        def run(x: torch.Tensor) -> torch.Tensor:
            nonlocal encoder_seconds
            t = time.perf_counter()
            y = encoder(x)
            encoder_seconds += time.perf_counter() - t
            return y
        return run

    runner.groups = [(timed(encoder), idx) for encoder, idx in runner.groups]
    samples, skipped = read_samples(args.images, args.masks, args.labels)
    rows, start = [], time.perf_counter()
    for s in tqdm(samples, desc="ensemble study", unit="image"):
        per_member = runner.member_probabilities([s])
        probs = [p[0][0] for p in per_member]
        row = {"stem": s["stem"], **score_pair(s["coarse"] > 255 * THRESHOLD, s["truth"], prefix="coarse_")}
        for name, p in zip(scored, probs, strict=True):
            row.update(score_pair(p > 0.5, s["truth"], prefix=f"{name}_"))
        ensemble = sum(probs[: len(members)]) / len(members)
        row.update(score_pair(ensemble > 0.5, s["truth"], prefix="ensemble_"))
        rows.append(row)
    total = time.perf_counter() - start  # includes the metric computation, reported apart below
    cols = [f"{k}_{m}" for k in ["coarse", *scored, "ensemble"] for m in METRIC_NAMES]
    summary = summarise(rows, cols)
    comparisons = {f"ensemble_vs_{k}": {m: paired_comparison([r[f"{k}_{m}"] for r in rows],
                                                              [r[f"ensemble_{m}"] for r in rows], m)
                                        for m in METRIC_NAMES} for k in ["coarse", *scored]}
    if args.soup:
        comparisons[f"soup_vs_{names[0]}"] = {m: paired_comparison([r[f"{names[0]}_{m}"] for r in rows],
                                                                   [r[f"soup_{m}"] for r in rows], m)
                                              for m in METRIC_NAMES}
    n = len(samples)
    encoder_per_image = encoder_seconds / n
    # the decoders' time: the members' share of the refine pass, measured by running them again on cached embeddings
    with torch.no_grad():
        s = samples[0]
        emb = runner.groups[0][0](encoder_input(members[0], s, False, torch.device("cpu")))
        coarse = torch.from_numpy(s["coarse"])[None, None].float() / 255
        t = time.perf_counter()
        for _ in range(3):
            for m in members:
                m(image_embeddings=emb, coarse=coarse, original_size=tuple(s["pixels"].shape))
        decoder_seconds = (time.perf_counter() - t) / 3 / len(members)
    cost = {"images": n, "skipped": skipped, "members": len(members), "encoder_groups": len(runner.groups),
            "encoder_s_per_image": encoder_per_image, "decoder_s_per_image_per_member": decoder_seconds,
            "single_refiner_s_per_image": encoder_per_image + decoder_seconds,
            "ensemble_s_per_image": encoder_per_image + len(members) * decoder_seconds,
            "study_wall_s": total, "threads": torch.get_num_threads(), "torch": torch.__version__}
    cost["ensemble_over_single"] = cost["ensemble_s_per_image"] / cost["single_refiner_s_per_image"]
    out = {"checkpoints": [str(p) for p in paths], "names": names, "summary": summary, "comparisons": comparisons,
           "cost": cost, "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1, allow_nan=True) + "\n")
    tmp.replace(args.output)
    print(f"{n} images ({len(skipped)} skipped by refine's rules, e.g. blank coarse masks), {len(members)} members, "
          f"{len(runner.groups)} encoder pass(es) per image")
    for m in [m for m in ("dice", "iou", "hd95", "nsd") if m in METRIC_NAMES]:  # all of them in the JSON
        print(f"\n{m}: " + ", ".join(f"{k} {summary[f'{k}_{m}']['mean']:.4f}"
                                     for k in ["coarse", *scored, "ensemble"]))
        for key, c in comparisons.items():
            c = c[m]
            print(f"  {key:<22s} {c['mean_diff']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]  "
                  f"better/worse {c['improved']}/{c['worsened']}")
    print(f"\ncost per image: encoder {encoder_per_image:.3f} s, each member's decoder {decoder_seconds:.3f} s; "
          f"ensemble / single refiner = {cost['ensemble_over_single']:.2f}x "
          f"({torch.get_num_threads()} threads, torch {torch.__version__})")


if __name__ == "__main__":
    main()
