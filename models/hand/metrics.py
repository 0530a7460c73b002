"""Hand metrics: per-head classification (accuracy, weighted precision / recall / F1, identity top-5) with torchmetrics,
open-set retrieval (one random gallery image per subject, the rest queries: rank-1, rank-5, mAP) and the protocol's
tables (overall and per aspect)."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from datamodules.hands11k import ASPECTS
from zoo.verification import cosine_gallery_ranks

HEADS = ("identity", "gender", "age")


def classification_metrics(logits: Tensor, target: Tensor, top5: bool = False) -> dict[str, float]:
    """logits (N, C), target (N,) class indices (-1 = not a known class, left out) -> acc, precision, recall, f1
    (weighted over classes by support, as upstream's test script reports them) and, with `top5`, top-5 accuracy."""
    keep = target >= 0
    logits, target = logits[keep].float(), target[keep].long()
    if len(target) == 0:
        return {}
    n = logits.shape[1]
    out = {"acc": multiclass_accuracy(logits, target, n, average="micro"),
           "precision": multiclass_precision(logits, target, n, average="weighted"),
           "recall": multiclass_recall(logits, target, n, average="weighted"),
           "f1": multiclass_f1_score(logits, target, n, average="weighted")}
    if top5 and n > 5:
        out["top5"] = multiclass_accuracy(logits, target, n, average="micro", top_k=5)
    return {k: float(v) for k, v in out.items()}


def draw_gallery_ranks(embeddings: Tensor, persons: Tensor, rng: np.random.Generator) -> Tensor:
    """One gallery draw: one random image per subject is the gallery, the other images are queries; returns each
    query's 0-based rank of its own subject (N_queries,) by cosine similarity, ties counting against the query
    (`zoo.verification.gallery_ranks`)."""
    persons = persons.long()
    gallery, queries = [], []
    for p in torch.unique(persons).tolist():
        idx = torch.nonzero(persons == p).flatten().tolist()
        g = idx[int(rng.integers(len(idx)))]
        gallery.append(g)
        queries += [i for i in idx if i != g]
    if not queries:
        return torch.empty(0)
    return cosine_gallery_ranks(embeddings, persons, gallery, queries)


def open_set_metrics(embeddings: Tensor, persons: Tensor, groups: Tensor | None = None, draws: int = 10,
                     seed: int = 0) -> dict[str, float]:
    """Rank-1, rank-5 and mAP (one relevant gallery image per query, so AP = 1 / (rank + 1)) averaged over `draws`
    seeded gallery draws; with `groups` (e.g. aspects) each group is its own gallery/query set and the queries of all
    groups are pooled. NaN when no subject has two images."""
    rng = np.random.default_rng(seed)
    groups = torch.zeros_like(persons) if groups is None else groups
    results = []
    for _ in range(max(1, draws)):
        ranks = [draw_gallery_ranks(embeddings[groups == g], persons[groups == g], rng) for g in torch.unique(groups)]
        ranks = torch.cat(ranks) if ranks else torch.empty(0)
        if len(ranks):
            results.append([(ranks < 1).float().mean(), (ranks < 5).float().mean(), (1.0 / (ranks + 1)).mean()])
    if not results:
        return {"rank1": float("nan"), "rank5": float("nan"), "mAP": float("nan")}
    mean = torch.tensor(results).mean(0).tolist()
    return {"rank1": mean[0], "rank5": mean[1], "mAP": mean[2]}


def protocol_tables(outputs: dict[str, Tensor], draws: int = 10, seed: int = 0) -> dict[str, dict[str, float]]:
    """Metrics overall and per aspect from concatenated outputs (identity/gender/age logits, embedding, and the
    targets identity_t, gender_t, age_t, person, aspect): {"overall" | aspect: {"identity_acc", "identity_f1", ...,
    "identity_top5", "rank1", "rank5", "mAP"}}. Retrieval is per aspect (gallery and queries of one aspect;
    overall pools the aspects when no subject has two images of one aspect, as in small validation splits)."""
    tables: dict[str, dict[str, float]] = {}
    aspect = outputs["aspect"]
    for name, keep in [("overall", torch.ones_like(aspect, dtype=torch.bool))] + [
            (a, aspect == i) for i, a in enumerate(ASPECTS)]:
        if not keep.any():
            continue
        row: dict[str, float] = {}
        for head in HEADS:
            for k, v in classification_metrics(outputs[head][keep], outputs[f"{head}_t"][keep], head == "identity").items():
                row[f"{head}_{k}"] = v
        retrieval = open_set_metrics(outputs["embedding"][keep], outputs["person"][keep], aspect[keep], draws, seed)
        if name == "overall" and retrieval["rank1"] != retrieval["rank1"]:
            # No subject has two images of one aspect (a small split): pool the aspects instead of reporting NaN.
            retrieval = open_set_metrics(outputs["embedding"], outputs["person"], None, draws, seed)
        row.update(retrieval)
        tables[name] = row
    return tables
