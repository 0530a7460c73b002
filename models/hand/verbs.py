"""`predict.py` verbs of the hand task: identify (closed set, or open set against an enrolled gallery), enroll,
evaluate (the protocol's tables on an 11k Hands folder)."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from zoo.commands import Command
from zoo.errors import ZooError
from zoo.fingerprint import model_fingerprint, short
from zoo.images import collect_images, load_rgb


def run_images(model, paths: list[Path], batch_size: int = 32) -> dict[str, torch.Tensor]:
    """The model's outputs (identity / gender / age logits, embedding) for image files, preprocessed as validation."""
    from datamodules.hands11k import build_transform

    transform = build_transform(model.cfg.image_size, train=False)
    model.eval()
    chunks: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):
            x = torch.stack([transform(image=load_rgb(p))["image"] for p in paths[i:i + batch_size]])
            out = model(x.to(model.device))
            for k in ("identity", "gender", "age", "embedding"):
                chunks.setdefault(k, []).append(out[k].float().cpu())
    return {k: torch.cat(v) for k, v in chunks.items()}


# ----- gallery files (safetensors: tensors + JSON metadata, never pickle) -----
@dataclass
class Gallery:
    """An enrolled gallery: embeddings (N, E), the person and the image file of each row, and the fingerprint of the
    model that embedded them (`zoo.fingerprint`; None in galleries written before galleries recorded it, as are
    `images`)."""

    embeddings: torch.Tensor
    persons: list[str]
    model: str | None = None
    images: list[str] | None = None
    task: str = "hand"


def read_gallery(path: Path) -> Gallery:
    """The gallery in a file written by `enroll`; empty when the file does not exist."""
    from safetensors import safe_open

    if not path.exists():
        return Gallery(torch.empty(0, 0), [])
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            emb = f.get_tensor("embeddings")
        names = json.loads(meta.get("persons", "[]"))
        images = json.loads(meta["images"]) if "images" in meta else None
    except Exception as e:
        raise ZooError(f"--gallery {path}: not a gallery file written by `enroll` ({type(e).__name__}: "
                       f"{str(e)[:120]}). Give another path, or delete it to start a new gallery.") from None
    if len(names) != len(emb) or (images is not None and len(images) != len(emb)):
        raise ZooError(f"--gallery {path}: {len(emb)} embeddings but {len(names)} names; the file is damaged.")
    return Gallery(emb, names, meta.get("model"), images, meta.get("task", "hand"))


def write_gallery(path: Path, gallery: Gallery, model) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"persons": json.dumps(gallery.persons), "task": "hand", "image_size": str(model.cfg.image_size),
            "model": gallery.model or "", "images": json.dumps(gallery.images or [])}
    save_file({"embeddings": gallery.embeddings.contiguous().float()}, str(path), metadata=meta)


def check_gallery_model(path: Path, gallery: Gallery, fingerprint: str, ckpt: str, adding: bool) -> None:
    """Refuse a gallery enrolled by another model (ZooError naming both fingerprints and the fix). A gallery from
    before fingerprints: a notice when reading it (`adding=False`), a refusal when adding to it."""
    if gallery.task != "hand":
        raise ZooError(f"--gallery {path} was enrolled by a '{gallery.task}' model, not a 'hand' model; use a "
                       f"gallery enrolled with this task.")
    if not gallery.model:
        old = (f"--gallery {path} does not record the model that enrolled it (written before galleries did), so it "
               f"cannot be checked against this model ({short(fingerprint)})")
        if adding:
            raise ZooError(f"{old}: adding to it could mix two models. Enroll everyone anew into a new gallery file.")
        print(f"notice: {old}; its answers are only right if {ckpt} enrolled it. Enroll anew into a new gallery "
              f"file to have that checked.", file=sys.stderr)
        return
    if gallery.model != fingerprint:
        raise ZooError(f"--gallery {path} was enrolled by model {short(gallery.model)}, not by {ckpt} (model "
                       f"{short(fingerprint)}): their embeddings are not comparable. Use the checkpoint that enrolled "
                       f"it, or re-embed its images with this one: `predict.py --ckpt {ckpt} enroll --gallery {path} "
                       f"--re-enroll`.")


def match_gallery(query: torch.Tensor, emb: torch.Tensor, names: list[str]) -> list[tuple[str, float]]:
    """Per query: the enrolled person with the most similar enrolled embedding (cosine), and that similarity."""
    sim = torch.nn.functional.normalize(query, dim=-1) @ torch.nn.functional.normalize(emb, dim=-1).T
    best = sim.max(dim=1)
    return [(names[int(j)], float(s)) for s, j in zip(best.values, best.indices)]


# ----- identify -----
def _identify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--top-k", type=int, default=3, help="closed set: the K most likely training identities")
    p.add_argument("--gallery", default=None, help="open set: a gallery file written by `enroll`")
    p.add_argument("--threshold", type=float, default=None, help="open set: cosine similarity below which the answer "
                   "is 'unknown' (default: the one calibrated on validation, stored in the checkpoint)")
    p.add_argument("--json", action="store_true")


def _identify(model, args) -> int:
    from datamodules.hands11k import age_group_names

    paths = collect_images(args.images)
    gallery = None
    if args.gallery:  # checked before any image is embedded
        gallery = read_gallery(Path(args.gallery))
        if not gallery.persons:
            raise ZooError(f"--gallery {args.gallery}: no such gallery (or it is empty). Enrol people first: "
                           f"`predict.py --ckpt ... enroll --gallery {args.gallery} --person NAME IMAGES`.")
        check_gallery_model(Path(args.gallery), gallery, model_fingerprint(model), args.ckpt, adding=False)
    out = run_images(model, paths)
    cfg = model.cfg
    ages, genders = age_group_names(tuple(cfg.age_bins)), list(cfg.gender_names)
    ids = list(cfg.identity_names) or [str(i) for i in range(cfg.num_identities)]
    results = []
    if gallery:
        if gallery.embeddings.shape[1] != out["embedding"].shape[1]:
            raise ZooError(f"--gallery {args.gallery}: embeddings of size {gallery.embeddings.shape[1]}, this model "
                           f"makes {out['embedding'].shape[1]}; enrol again with this checkpoint.")
    thr = float(model.threshold) if args.threshold is None else args.threshold
    matches = match_gallery(out["embedding"], gallery.embeddings, gallery.persons) if gallery else []
    for i, path in enumerate(paths):
        prob = out["identity"][i].softmax(-1)
        k = min(args.top_k, len(prob))
        top = prob.topk(k)
        r = {"image": str(path),
             "identity": [{"id": ids[int(j)], "probability": float(p)} for p, j in zip(top.values, top.indices)],
             "gender": genders[int(out["gender"][i].argmax())], "age_group": ages[int(out["age"][i].argmax())]}
        if gallery:
            name, sim = matches[i]
            r["gallery"] = {"person": name if sim >= thr else "unknown", "nearest": name, "similarity": sim,
                            "threshold": thr}
        results.append(r)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        top = ", ".join(f"{t['id']} {t['probability']:.3f}" for t in r["identity"])
        line = f"{r['image']}: identity {top} | gender {r['gender']} | age {r['age_group']}"
        if "gallery" in r:
            g = r["gallery"]
            line += f" | gallery: {g['person']} (nearest {g['nearest']}, similarity {g['similarity']:.3f}, " \
                    f"threshold {g['threshold']:.3f})"
        print(line)
    return 0


# ----- enroll -----
def _enroll_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*", help="image files or folders of images of this person")
    p.add_argument("--gallery", required=True, help="gallery file (safetensors; created if absent)")
    p.add_argument("--person", default=None, help="the person's name (needed with images)")
    p.add_argument("--re-enroll", action="store_true", help="first re-embed every image the gallery holds with this "
                   "checkpoint (from the image paths it recorded), e.g. after training a new model")


def _enroll(model, args) -> int:
    path = Path(args.gallery)
    if not args.re_enroll and not args.images:
        raise ZooError("enroll needs images of the person (files or folders), or --re-enroll to re-embed the gallery.")
    if args.images and not args.person:
        raise ZooError("enroll needs --person NAME for the images given.")
    paths = collect_images(args.images) if args.images else []
    fingerprint = model_fingerprint(model)
    gallery = read_gallery(path)
    if args.re_enroll and not gallery.persons and not paths:
        raise ZooError(f"--gallery {path}: no such gallery (or it is empty); nothing to re-enroll.")
    if args.re_enroll and gallery.persons:
        if not gallery.images:
            raise ZooError(f"--gallery {path} --re-enroll: the gallery does not record its images (written before "
                           f"galleries did). Enroll everyone anew into a new gallery file.")
        missing = [p for p in gallery.images if not Path(p).is_file()]
        if missing:
            raise ZooError(f"--gallery {path} --re-enroll: {len(missing)} enrolled image(s) are gone, e.g. "
                           f"{missing[0]}. Put them back, or enroll anew into a new gallery file.")
        embeddings = run_images(model, [Path(p) for p in gallery.images])["embedding"]
        gallery = Gallery(embeddings, gallery.persons, fingerprint, gallery.images)
        print(f"re-embedded {len(gallery.persons)} image(s) of {path} with model {short(fingerprint)}")
    elif gallery.persons:
        check_gallery_model(path, gallery, fingerprint, args.ckpt, adding=True)
    if paths:
        new = run_images(model, paths)["embedding"]
        if gallery.persons and gallery.embeddings.shape[1] != new.shape[1]:
            raise ZooError(f"--gallery {path}: embeddings of size {gallery.embeddings.shape[1]}, this model makes "
                           f"{new.shape[1]}; use a new gallery file for this checkpoint.")
        gallery = Gallery(torch.cat([gallery.embeddings, new]) if gallery.persons else new,
                          gallery.persons + [args.person] * len(new), fingerprint,
                          (gallery.images or []) + [str(p.resolve()) for p in paths])
    write_gallery(path, gallery, model)
    if paths:
        print(f"enrolled {len(paths)} image(s) of {args.person!r} in {path} ({len(set(gallery.persons))} people, "
              f"{len(gallery.persons)} images)")
    return 0


# ----- evaluate -----
def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir", help="an 11k Hands folder (HandInfo.csv + Hands/)")
    p.add_argument("--protocol", choices=["closed_set", "open_set"], default=None,
                   help="default: the checkpoint's (closed_set: the val split; open_set: the test half)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="data options, e.g. --set skip_missing_images=true --set aspects='dorsal right'")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=None, metavar="RESULT_JSON", help="also write the result as JSON to this file, "
                   "with its ROC and DET curves beside it (<stem>_roc.png, <stem>_det.png)")


def evaluate_folder(model, data_dir: str, protocol: str | None = None, overrides: list[str] | None = None,
                    batch_size: int = 32, with_outputs: bool = False):
    """The protocol's tables ({"overall" | aspect: metrics}) of `model` on an 11k Hands folder; with `with_outputs`
    also the concatenated outputs and targets (embedding, person, ...)."""
    from datamodules.hands11k import Hands11kDataModule
    from models.hand.metrics import protocol_tables

    cfg = model.cfg.replace(protocol=protocol or model.cfg.protocol, num_workers=0, batch_size=batch_size)
    cfg = cfg.with_overrides(overrides or [])
    dm = Hands11kDataModule(cfg, data_dir)
    dm.prepare_data()
    split = "val" if cfg.protocol == "closed_set" else "test"
    loader = dm.loader(dm.dataset(split), train=False)
    chunks: dict[str, list[torch.Tensor]] = {}
    model.eval()
    with torch.no_grad():
        for batch in loader:
            out = model(batch["image"].to(model.device))
            for k in ("identity", "gender", "age", "embedding"):
                chunks.setdefault(k, []).append(out[k].float().cpu())
            for k in ("identity", "gender", "age"):
                chunks.setdefault(f"{k}_t", []).append(batch[k])
            for k in ("person", "aspect"):
                chunks.setdefault(k, []).append(batch[k])
    outputs = {k: torch.cat(v) for k, v in chunks.items()}
    tables = protocol_tables(outputs, cfg.gallery_draws, cfg.split_seed)
    result = {"protocol": cfg.protocol, "split": split, "images": len(outputs["aspect"]), "tables": tables}
    return (result, outputs) if with_outputs else result


def _evaluate(model, args) -> int:
    from zoo.verification import all_pair_scores, verification_summary, write_result

    result, outputs = evaluate_folder(model, args.data_dir, args.protocol, args.overrides, args.batch_size,
                                      with_outputs=True)
    curves = {"every pair": all_pair_scores(outputs["embedding"], outputs["person"])}
    result["every_pair"] = verification_summary(*curves["every pair"])
    if args.out:
        result["plots"] = [str(p) for p in write_result(args.out, result, curves,
                                                         f"hand, {result['protocol']}, {result['split']} split")]
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    tables = result["tables"]
    cols = sorted({k for row in tables.values() for k in row}, key=lambda k: (k.split("_")[0], k))
    print(f"{result['protocol']} protocol, {result['split']} split, {result['images']} images")
    print(f"{'metric':<22}" + "".join(f"{name:>14}" for name in tables))
    for c in cols:
        print(f"{c:<22}" + "".join(f"{tables[n].get(c, float('nan')):>14.4f}" for n in tables))
    every = result["every_pair"]
    print(f"every pair: AUC {every['auc']:.4f}, EER {every['eer']:.4f}, TAR@FAR=1e-3 {every['tar_at_far_1e-3']:.4f}")
    if args.out:
        print(f"wrote {args.out} and {', '.join(result['plots'])}")
    return 0


COMMANDS: list[Command] = [
    Command("identify", "closed-set identity (top-k), gender and age group; with --gallery the nearest enrolled "
            "person or 'unknown'", _identify_args, _identify, aliases=("predict",)),
    Command("enroll", "add a person's images to a gallery file (safetensors)", _enroll_args, _enroll),
    Command("evaluate", "the protocol's tables (overall and per aspect) on an 11k Hands folder", _evaluate_args,
            _evaluate),
]
