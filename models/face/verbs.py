"""`predict.py` verbs of the face task: compare (alias predict), evaluate, visualize."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from zoo.commands import Command
from zoo.errors import ZooError
from zoo.images import drop_bad_images, load_rgb

NAMES = {"rank1": "Rank-1 (Recall@1)", "r_precision": "R-Precision", "mean_average_precision_at_r": "MAP@R"}


def embed_items(model, paths: list, batch_size: int = 64, with_thumbnails: bool = False):
    """Embeddings (N, D) float32 of image files, preprocessed as in validation; optionally also small thumbnails
    (data URIs) for the HTML page. An unreadable file is an `ImageReadError` naming it (callers check folders with
    `zoo.images.drop_bad_images` first)."""
    from callbacks.embeddings import thumbnail_b64
    from datamodules.lfw import build_transform

    transform = build_transform(model.cfg.image_size)
    was_training = model.training
    chunks, thumbs = [], []
    for i in range(0, len(paths), batch_size):
        images = [load_rgb(p) for p in paths[i:i + batch_size]]
        if with_thumbnails:
            thumbs += [thumbnail_b64(im) for im in images]
        chunks.append(model.embed(torch.stack([transform(image=im)["image"] for im in images])))
    model.train(was_training)
    emb = torch.cat(chunks) if chunks else torch.empty(0, model.cfg.embedding_dim)
    return (emb, thumbs) if with_thumbnails else emb


def _identities(folder: str, split: str, min_images: int, cfg=None, everyone: bool = True):
    """{person: images} of a folder in either face layout (see datamodules.lfw), the layout, and the images left out
    as unreadable (reported on stderr).

    Pre-split layout: the `split` folder. People layout: every identity with `everyone`, else the identity-disjoint
    `split` share that training drew with `cfg` (split fractions, seed, min_images_per_person).
    """
    from datamodules.lfw import detect_layout, scan_people
    from datamodules.splits import seeded_split

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ZooError(f"{root} is not a folder. Expected a folder of identities: <folder>/<person>/<image>.")
    layout = detect_layout(root)
    people = scan_people(layout.root / split if layout.kind == "split" else layout.root)
    if layout.kind == "people" and not everyone:
        k = max(1, int(cfg.min_images_per_person))
        eligible = sorted(n for n, ims in people.items() if len(ims) >= k)
        chosen = seeded_split(eligible, tuple(cfg.split), int(cfg.seed))[split]
        if not chosen:
            raise ZooError(f"{root}: the {split} split of the checkpoint's split={tuple(cfg.split)} holds no identity; "
                           f"use --all to score every identity.")
        people = {n: people[n] for n in chosen}
    every = [p for ims in people.values() for p in ims]
    good = set(drop_bad_images(every, where=str(layout.root)))
    bad = set(every) - good
    people = {n: [p for p in ims if p in good] for n, ims in people.items()}
    people = {n: ims for n, ims in people.items() if len(ims) >= min_images}
    if not people:
        raise ZooError(f"{root}: no identity with at least {min_images} images (--min-images).")
    return people, layout, bad


# ----- compare -----
def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("image_a")
    p.add_argument("image_b")
    p.add_argument("--threshold", type=float, default=None, help="cosine threshold (default: the one calibrated on "
                   "validation and stored in the checkpoint)")
    p.add_argument("--json", action="store_true")


def _compare(model, args) -> int:
    for path in (args.image_a, args.image_b):
        load_rgb(path)  # the same message as every task for a missing or unreadable image
    emb = embed_items(model, [args.image_a, args.image_b])
    sim = float((emb[0] * emb[1]).sum())
    thr = float(model.threshold) if args.threshold is None else args.threshold
    same = sim >= thr
    if args.json:
        print(json.dumps({"similarity": sim, "threshold": thr, "same": same}))
    else:
        print(f"cosine similarity {sim:.4f} -> {'same person' if same else 'different people'} "
              f"(threshold {thr:.4f}{', calibrated on validation' if args.threshold is None else ''})")
    return 0


# ----- evaluate -----
def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="identities: <folder>/<person>/<image> (LFW layout) or <folder>/{train,val,test}/...")
    p.add_argument("--split", default="test", help="which split to score (default test): the split folder of the "
                   "pre-split layout, or in the people layout the identity-disjoint share drawn as in training")
    p.add_argument("--all", action="store_true", help="people layout: score every identity, training ones included")
    p.add_argument("--min-images", type=int, default=2, help="people with fewer images are left out of retrieval")
    p.add_argument("--pairs", nargs="?", const="auto", default=None, metavar="PAIRS_TXT",
                   help="also run the k-fold verification protocol of this pairs.txt (no value: the pairs.txt found "
                        "beside the images); image paths are resolved under the LFW people folder")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=None, metavar="RESULT_JSON", help="also write the result as JSON to this file, "
                   "with its ROC and DET curves beside it (<stem>_roc.png, <stem>_det.png)")


def _evaluate(model, args) -> int:
    from datamodules.lfw import pairs_file_of
    from datamodules.lfw_pairs import load_pairs
    from models.face.metrics import pairs_scored, retrieval_metrics
    from zoo.verification import (
        CALIBRATION_FOLD,
        all_pair_scores,
        calibrate_threshold,
        kfold_verification,
        verification_summary,
        write_result,
    )

    people, layout, bad = _identities(args.folder, args.split, args.min_images, model.cfg, everyone=args.all)
    paths = [p for n in sorted(people) for p in people[n]]
    labels = torch.tensor([i for i, n in enumerate(sorted(people)) for _ in people[n]])
    emb = embed_items(model, paths, args.batch_size)
    scope = "every identity" if args.all or layout.kind == "split" else f"the identity-disjoint {args.split} split"
    result: dict = {"images": len(paths), "identities": len(people), "scope": scope, "unreadable": sorted(map(str, bad)),
                    **retrieval_metrics(emb, labels)}
    thr, acc = calibrate_threshold(emb, labels)
    result.update(best_threshold_here=thr, balanced_pair_acc=acc, checkpoint_threshold=float(model.threshold))
    curves = {"every pair": all_pair_scores(emb, labels)}
    result["every_pair"] = verification_summary(*curves["every pair"])
    verification = None
    if args.pairs:
        pairs_file = pairs_file_of(args.pairs, layout)
        if pairs_file is None:
            raise ZooError(f"--pairs: no pairs.txt beside the images in {layout.root}; give its path: --pairs PATH.")
        pair_set = load_pairs(pairs_file, layout.root, exclude=bad)
        images = pair_set.images
        scores, same, folds = pairs_scored(embed_items(model, images, args.batch_size), images, pair_set.pairs)
        verification = kfold_verification(scores, same, folds)
        scored = folds != CALIBRATION_FOLD
        curves[pair_set.file.name] = (scores[scored], same[scored])
        result["verification"] = {**verification.to_dict(), **verification_summary(*curves[pair_set.file.name]),
                                  "pairs_scored": len(pair_set.scored), "pairs_in_file": pair_set.total,
                                  "pairs_skipped": len(pair_set.skipped), "protocol": pair_set.note}
    if args.out:
        result["plots"] = [str(p) for p in write_result(args.out, result, curves, f"face, {scope}")]
    status = 1 if bad else 0  # the unreadable files were named on stderr
    if args.json:
        print(json.dumps(result, indent=2))
        return status
    print(f"{result['identities']} identities, {result['images']} images ({scope})")
    for k, name in NAMES.items():
        print(f"{name:<24}{result[k]:.4f}")
    print(f"{'best threshold here':<24}{thr:.4f} (balanced pair accuracy {acc:.4f}; checkpoint's {model.threshold:.4f})")
    every = result["every_pair"]
    print(f"{'every pair':<24}AUC {every['auc']:.4f}, EER {every['eer']:.4f}, TAR@FAR=1e-3 {every['tar_at_far_1e-3']:.4f}")
    if verification is not None:
        print(f"\n{len(verification.accuracies)}-fold verification ({result['verification']['protocol']}):\n"
              f"{verification.table()}")
    if args.out:
        print(f"wrote {args.out} and {', '.join(result['plots'])}")
    return status


# ----- visualize -----
def _visualize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="identities: <folder>/<person>/<image> (or the pre-split layout, see --split)")
    p.add_argument("--split", default="test", help="with the pre-split layout: which split (default test)")
    p.add_argument("--out", default="embeddings.html", help="HTML page to write (default embeddings.html)")
    p.add_argument("--method", choices=["tsne", "pca"], default="tsne")
    p.add_argument("--perplexity", type=float, default=15.0, help="t-SNE perplexity (upstream 15)")
    p.add_argument("--min-images", type=int, default=1)
    p.add_argument("--max-images", type=int, default=3000, help="draw at most this many images (whole identities)")
    p.add_argument("--seed", type=int, default=0)


def _visualize(model, args) -> int:
    from callbacks.embeddings import log_html_to_wandb, project_2d, write_embedding_html

    people, _, bad = _identities(args.folder, args.split, args.min_images)
    paths, names = [], []
    for n in sorted(people):
        if paths and len(paths) + len(people[n]) > args.max_images:
            break
        paths += people[n]
        names += [n] * len(people[n])
    emb, thumbs = embed_items(model, paths, with_thumbnails=True)
    coords = project_2d(emb.numpy(), args.method, args.perplexity, args.seed)
    out = write_embedding_html(args.out, coords, names, [p.name for p in paths], thumbs,
                               title=f"{len(paths)} faces of {len(set(names))} people ({args.method})")
    logged = log_html_to_wandb(out)
    print(f"wrote {out} ({len(paths)} points){' and logged it to W&B' if logged else ''}")
    return 1 if bad else 0


COMMANDS: list[Command] = [
    Command("compare", "two images -> cosine similarity and same/different at the calibrated threshold",
            _compare_args, _compare, aliases=("predict",)),
    Command("evaluate", "retrieval metrics (rank-1, R-Precision, MAP@R) on a folder of identities, and the k-fold "
            "verification table with --pairs", _evaluate_args, _evaluate),
    Command("visualize", "2-D map (t-SNE / PCA) of a folder's embeddings as an interactive HTML page with "
            "thumbnails, logged to W&B when a run is active", _visualize_args, _visualize),
]



