"""Face metrics on embeddings: retrieval (precision@1, R-Precision, MAP@R) and LFW pairs verification; the pair maths
(scores, thresholds, k-fold accuracy) is `zoo.verification`."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from zoo.verification import VerificationResult, kfold_verification, pair_scores

RETRIEVAL_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")  # pytorch-metric-learning's
NAMES = {"precision_at_1": "rank1"}  # the zoo's name where it has one (docs/conventions.md: the same in every task)


def retrieval_metrics(embeddings: Tensor, labels: Tensor) -> dict[str, float]:
    """pytorch-metric-learning's AccuracyCalculator with queries = references = the split (each query's own image
    excluded), k = the largest class size, as upstream FaceRegSMM reports them. Identities with a single image have
    no relevant reference and are left out of the averages.

    embeddings: (N, D) L2-normalised; labels: (N,) int identity. Returns {name: value in [0, 1]}: rank1 (precision@1,
    the nearest other image is the same identity), r_precision, mean_average_precision_at_r.
    """
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    # Exact k-NN in torch (faiss is optional and not installed); cosine ranks like L2 on unit vectors.
    calc = AccuracyCalculator(include=RETRIEVAL_METRICS, k="max_bin_count", device=torch.device("cpu"),
                              knn_func=CustomKNN(CosineSimilarity()))
    emb = embeddings.detach().float().cpu()
    lab = labels.detach().long().cpu()
    if len(torch.unique(lab)) < 2 or torch.bincount(lab - lab.min()).max() < 2:
        return {NAMES.get(k, k): float("nan") for k in RETRIEVAL_METRICS}
    out = calc.get_accuracy(emb, lab, ref_includes_query=True)
    return {NAMES.get(k, k): float(out[k]) for k in RETRIEVAL_METRICS}


def pairs_scored(embeddings: Tensor, images: list, pairs: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cosine scores, same, fold) of `pairs` (datamodules.lfw_pairs.Pair) given (N, D) embeddings of `images`."""
    where = {p: i for i, p in enumerate(images)}
    scores = pair_scores(embeddings[[where[p.a] for p in pairs]], embeddings[[where[p.b] for p in pairs]])
    return scores, np.array([p.same for p in pairs], dtype=bool), np.array([p.fold for p in pairs])


def verify_pairs(embeddings: Tensor, images: list, pairs: list) -> VerificationResult:
    """LFW k-fold verification of `pairs` (datamodules.lfw_pairs.Pair) given (N, D) embeddings of `images` (same
    order)."""
    return kfold_verification(*pairs_scored(embeddings, images, pairs))
