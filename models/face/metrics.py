"""Face metrics on embeddings: retrieval (precision@1, R-Precision, MAP@R) and pair similarities for verification."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from datamodules.lfw_pairs import best_threshold

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


def all_pair_scores(embeddings: Tensor, labels: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity and same-identity flag of every unordered pair (i < j) of a split: (P,), (P,) bool."""
    emb = torch.nn.functional.normalize(embeddings.detach().float().cpu(), dim=1)
    sim = emb @ emb.T
    i, j = torch.triu_indices(len(emb), len(emb), offset=1)
    return sim[i, j].numpy(), (labels[i] == labels[j]).cpu().numpy()


def calibrate_threshold(embeddings: Tensor, labels: Tensor) -> tuple[float, float]:
    """Best balanced-accuracy cosine threshold over all pairs of a split: (threshold, balanced accuracy)."""
    scores, same = all_pair_scores(embeddings, labels)
    if same.sum() == 0 or same.all():
        return float("nan"), float("nan")
    return best_threshold(scores, same, balanced=True)
