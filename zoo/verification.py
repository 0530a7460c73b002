"""Verification and identification maths shared by the identity tasks (face, hand, palm): cosine pair scores, the
best-accuracy threshold, LFW's k-fold verification, ROC AUC / EER / TAR@FAR, gallery ranks with one tie rule, and
ROC + DET plots written as PNG.

Conventions: a score is a similarity (higher = more alike); a pair is judged "same" iff score >= threshold. FAR
(false-accept rate) is the share of different-identity pairs accepted, TAR = 1 - FRR the share of same-identity pairs
accepted. In a gallery, a tie between a query's own identity and another identity counts against the query (a
collapsed, constant embedding scores rank-1 = 0, never 1). Pure torch / numpy / scikit-learn / Pillow.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

CALIBRATION_FOLD = -1  # fold index of pairs used only to choose the threshold of a one-fold protocol
PLOT_FAR = 1e-3  # the operating point marked on the plots (TAR@FAR=1e-3)


# ----- scores -----
def pair_scores(a: Tensor, b: Tensor) -> np.ndarray:
    """Cosine similarity of paired embeddings (P, D) x (P, D) -> (P,) float64."""
    return (F.normalize(a.detach().double().cpu(), dim=-1) * F.normalize(b.detach().double().cpu(), dim=-1)).sum(-1).numpy()


def all_pair_scores(embeddings: Tensor, labels: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity and same-identity flag of every unordered pair (i < j) of a set: (P,), (P,) bool."""
    emb = F.normalize(embeddings.detach().float().cpu(), dim=1)
    sim = emb @ emb.T
    i, j = torch.triu_indices(len(emb), len(emb), offset=1)
    labels = labels.detach().cpu()
    return sim[i, j].double().numpy(), (labels[i] == labels[j]).numpy()


# ----- thresholds -----
def best_threshold(scores: np.ndarray, same: np.ndarray, balanced: bool = False) -> tuple[float, float]:
    """The similarity threshold with the best accuracy on these pairs: (threshold, accuracy).

    Candidates are the midpoints between consecutive distinct scores (plus both ends). With `balanced` the accuracy is
    the mean of the true-positive and true-negative rates, i.e. the accuracy on a set with as many positive as negative
    pairs, which is what a threshold calibrated on all pairs of a split needs (negatives outnumber positives).
    """
    scores, same = np.asarray(scores, dtype=np.float64), np.asarray(same, dtype=bool)
    if len(scores) == 0:
        return 0.5, 0.0
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], same[order]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    # Predicting the first t (highest) scores as "same": t = 0..n.
    tp = np.concatenate([[0], np.cumsum(y)])
    fp = np.concatenate([[0], np.cumsum(~y)])
    tn = n_neg - fp
    if balanced:
        acc = 0.5 * (tp / max(n_pos, 1) + tn / max(n_neg, 1))
    else:
        acc = (tp + tn) / len(s)
    valid = np.ones(len(s) + 1, dtype=bool)  # only cut between distinct scores
    valid[1:-1] = s[:-1] != s[1:]
    acc = np.where(valid, acc, -1.0)
    t = int(np.argmax(acc))
    if t == 0:
        thr = s[0] + 1e-6
    elif t == len(s):
        thr = s[-1] - 1e-6
    else:
        thr = 0.5 * (s[t - 1] + s[t])
    return float(thr), float(acc[t])


def calibrate_threshold(embeddings: Tensor, labels: Tensor) -> tuple[float, float]:
    """Best balanced-accuracy cosine threshold over all pairs of a set: (threshold, balanced accuracy); NaNs without
    both same- and different-identity pairs."""
    scores, same = all_pair_scores(embeddings, labels)
    if same.sum() == 0 or same.all():
        return float("nan"), float("nan")
    return best_threshold(scores, same, balanced=True)


# ----- k-fold verification (LFW's protocol) -----
@dataclass
class VerificationResult:
    """k-fold verification: per-fold (threshold, accuracy), their mean and std, and the ROC AUC over all pairs."""

    thresholds: list[float]
    accuracies: list[float]
    auc: float

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        return float(np.std(self.accuracies))

    def table(self) -> str:
        rows = ["fold  threshold  accuracy"]
        rows += [f"{i + 1:>4}  {t:>9.4f}  {a:>8.4f}" for i, (t, a) in enumerate(zip(self.thresholds, self.accuracies))]
        rows.append(f"mean             {self.mean:.4f} +- {self.std:.4f}")
        rows.append(f"ROC AUC          {self.auc:.4f}")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {"accuracy": self.mean, "accuracy_std": self.std, "auc": self.auc,
                "folds": [{"threshold": t, "accuracy": a} for t, a in zip(self.thresholds, self.accuracies)]}


def kfold_verification(scores: np.ndarray, same: np.ndarray, folds: np.ndarray, inner_folds: int = 10,
                       ) -> VerificationResult:
    """Accuracy on each fold at the best-accuracy threshold chosen on other pairs (LFW's protocol), and ROC AUC.

    scores: (n,) similarities; same: (n,) bool; folds: (n,) fold index of each pair, where `CALIBRATION_FOLD` marks
    pairs used only to choose the threshold of a one-fold protocol (LFW's pairsDevTrain.txt). Several folds: each
    fold's threshold comes from the other folds. One fold with calibration pairs: the threshold comes from those. One
    fold alone: `inner_folds`-fold cross-validation inside it (pairs dealt round-robin). A threshold is never chosen
    on the pairs it scores. The AUC is over the scored pairs.
    """
    scores, same, folds = np.asarray(scores, dtype=np.float64), np.asarray(same, dtype=bool), np.asarray(folds)
    calib = folds == CALIBRATION_FOLD
    cal_scores, cal_same = scores[calib], same[calib]
    scores, same, folds = scores[~calib], same[~calib], folds[~calib]
    fold_ids = np.unique(folds)
    if len(fold_ids) == 1 and not calib.any():
        k = int(min(inner_folds, len(scores)))
        folds = np.arange(len(scores)) % max(k, 1)
        fold_ids = np.unique(folds)
    thresholds, accuracies = [], []
    for f in fold_ids:
        test = folds == f
        if len(fold_ids) > 1:
            thr, _ = best_threshold(scores[~test], same[~test])
        else:  # one fold and calibration pairs
            thr, _ = best_threshold(cal_scores, cal_same)
        thresholds.append(thr)
        accuracies.append(float(np.mean((scores[test] >= thr) == same[test])))
    return VerificationResult(thresholds, accuracies, auc_eer(scores, same)[0])


# ----- ROC, AUC, EER, TAR@FAR -----
def _both_kinds(same: np.ndarray) -> bool:
    return bool(same.any()) and not bool(same.all())


def roc(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FAR, TAR, thresholds) at every distinct score (scikit-learn's roc_curve, no point dropped)."""
    from sklearn.metrics import roc_curve

    far, tar, thr = roc_curve(np.asarray(same, dtype=bool), np.asarray(scores, dtype=np.float64),
                              drop_intermediate=False)
    return far, tar, thr


def auc_eer(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """ROC AUC and equal error rate of similarity `scores` (P,) for pairs labelled `same` (P,) bool; the EER is
    interpolated linearly where FAR and FRR cross. NaNs without both kinds of pair."""
    from sklearn.metrics import roc_auc_score

    same = np.asarray(same, dtype=bool)
    if not _both_kinds(same):
        return float("nan"), float("nan")
    auc = float(roc_auc_score(same, scores))
    far, tar, _ = roc(scores, same)
    frr = 1.0 - tar
    i = int(np.nonzero(far >= frr)[0][0])  # first ROC point where FAR reaches FRR
    if i == 0:
        return auc, float(far[0])
    d0, d1 = far[i - 1] - frr[i - 1], far[i] - frr[i]
    w = d0 / (d0 - d1) if d0 != d1 else 0.0
    return auc, float(far[i - 1] + w * (far[i] - far[i - 1]))


def tar_at_far(scores: np.ndarray, same: np.ndarray, far: float = PLOT_FAR) -> float:
    """The highest TAR among thresholds whose FAR is at most `far` (no interpolation: with fewer than 1/far
    different-identity pairs this is the TAR at FAR = 0). NaN without both kinds of pair."""
    same = np.asarray(same, dtype=bool)
    if not _both_kinds(same):
        return float("nan")
    fars, tars, _ = roc(scores, same)
    return float(tars[fars <= far + 1e-12].max())


def verification_summary(scores: np.ndarray, same: np.ndarray) -> dict[str, float]:
    """{"auc", "eer", "tar_at_far_1e-3"} of a set of scored pairs."""
    auc, eer = auc_eer(scores, same)
    return {"auc": auc, "eer": eer, "tar_at_far_1e-3": tar_at_far(scores, same, PLOT_FAR)}


# ----- gallery identification -----
def gallery_ranks(sim: Tensor, query_ids: Tensor, gallery_ids: Tensor) -> Tensor:
    """0-based rank of each query's own identity in a gallery: the number of gallery entries of OTHER identities
    whose similarity is >= the best similarity to an entry of the query's own identity (ties count against the
    query). sim: (Q, G) similarities; query_ids (Q,), gallery_ids (G,). A query whose identity has no gallery entry
    gets rank G (a miss at every k). Returns (Q,) long."""
    own = query_ids[:, None] == gallery_ids[None, :]  # (Q, G)
    neg_inf = torch.finfo(sim.dtype).min
    best_own = torch.where(own, sim, torch.full_like(sim, neg_inf)).max(1, keepdim=True).values
    ranks = ((sim >= best_own) & ~own).sum(1)
    return torch.where(own.any(1), ranks, torch.full_like(ranks, sim.shape[1]))


def rank_k(ranks: Tensor, k: int = 1) -> float:
    """Share of queries whose own identity is among the first k (rank < k); NaN for no query."""
    return float((ranks < k).float().mean()) if len(ranks) else float("nan")


def cosine_gallery_ranks(embeddings: Tensor, ids: Tensor, gallery: list[int] | Tensor, queries: list[int] | Tensor,
                         ) -> Tensor:
    """`gallery_ranks` of the `queries` rows against the `gallery` rows of (N, D) embeddings by cosine similarity."""
    emb = F.normalize(embeddings.detach().float().cpu(), dim=-1)
    ids = ids.detach().cpu()
    gallery, queries = torch.as_tensor(gallery, dtype=torch.long), torch.as_tensor(queries, dtype=torch.long)
    return gallery_ranks(emb[queries] @ emb[gallery].T, ids[queries], ids[gallery])


# ----- ROC and DET plots (PNG, drawn with Pillow) -----
def _probit(p: np.ndarray) -> np.ndarray:
    from statistics import NormalDist

    nd = NormalDist()
    return np.array([nd.inv_cdf(float(min(max(x, 1e-6), 1 - 1e-6))) for x in np.atleast_1d(p)])


def _draw_plot(path: Path, title: str, xlabel: str, ylabel: str, curves: list[tuple[str, np.ndarray, np.ndarray]],
               xticks: list[tuple[float, str]], yticks: list[tuple[float, str]], xr: tuple[float, float],
               yr: tuple[float, float], marks: list[tuple[str, float, float]], guides: list[list[tuple[float, float]]],
               ) -> None:
    """One line plot in transformed coordinates (already mapped to the axis scale)."""
    from PIL import Image, ImageDraw

    w, h, left, right, top, bottom = 720, 540, 70, 20, 40, 60
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)

    def xy(x: float, y: float) -> tuple[float, float]:
        fx = (min(max(x, xr[0]), xr[1]) - xr[0]) / (xr[1] - xr[0])
        fy = (min(max(y, yr[0]), yr[1]) - yr[0]) / (yr[1] - yr[0])
        return left + fx * (w - left - right), h - bottom - fy * (h - top - bottom)

    for v, label in xticks:
        px, _ = xy(v, yr[0])
        d.line([(px, top), (px, h - bottom)], fill=(225, 225, 225))
        d.text((px - 3 * len(label), h - bottom + 6), label, fill="black")
    for v, label in yticks:
        _, py = xy(xr[0], v)
        d.line([(left, py), (w - right, py)], fill=(225, 225, 225))
        d.text((left - 8 - 6 * len(label), py - 5), label, fill="black")
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for guide in guides:
        d.line([xy(*p) for p in guide], fill=(150, 150, 150), width=1)
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    for k, (label, xs, ys) in enumerate(curves):
        c = colours[k % len(colours)]
        d.line([xy(x, y) for x, y in zip(xs, ys)], fill=c, width=2)
        d.text((left + 10, top + 8 + 14 * k), label, fill=c)
    for k, (label, x, y) in enumerate(marks):
        if np.isfinite(x) and np.isfinite(y):
            px, py = xy(x, y)
            d.ellipse([px - 4, py - 4, px + 4, py + 4], outline="black", width=2)
        d.text((w - right - 300, h - bottom - 16 - 14 * (len(marks) - 1 - k)), label, fill="black")
    d.text((left, 12), title, fill="black")
    d.text(((w - 6 * len(xlabel)) / 2, h - 24), xlabel, fill="black")
    d.text((6, top - 18), ylabel, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="PNG")


def write_roc_det(path_stem: str | Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "",
                  ) -> list[Path]:
    """ROC (TAR against FAR, FAR on a log axis) and DET (FRR against FAR, both on normal-deviate axes) plots of one
    or more sets of scored pairs, with TAR@FAR=1e-3 and the EER of each marked: writes `<stem>_roc.png` and
    `<stem>_det.png` and returns their paths. curves: {label: (scores (P,), same (P,) bool)}; sets without both kinds
    of pair are left out."""
    stem = Path(path_stem)
    roc_curves, det_curves, roc_marks, det_marks = [], [], [], []
    lo = 1e-4
    for label, (scores, same) in curves.items():
        same = np.asarray(same, dtype=bool)
        if not _both_kinds(same):
            continue
        far, tar, _ = roc(scores, same)
        _, eer = auc_eer(scores, same)
        t = tar_at_far(scores, same, PLOT_FAR)
        s = verification_summary(scores, same)
        lo = min(lo, 0.5 / max(int((~same).sum()), 1))
        name = f"{label}: AUC {s['auc']:.4f}, EER {eer:.4f}, TAR@FAR=1e-3 {t:.4f}"
        roc_curves.append((name, np.log10(np.maximum(far, 1e-12)), tar))
        det_curves.append((name, _probit(far), _probit(1.0 - tar)))
        roc_marks += [(f"{label} TAR@FAR=1e-3 = {t:.4f}", np.log10(PLOT_FAR), t),
                      (f"{label} EER = {eer:.4f}", np.log10(max(eer, 1e-12)), 1.0 - eer)]
        det_marks += [(f"{label} EER = {eer:.4f}", _probit(eer)[0], _probit(eer)[0]),
                      (f"{label} TAR@FAR=1e-3 = {t:.4f}", _probit(PLOT_FAR)[0], _probit(1.0 - t)[0])]
    lo_exp = int(np.floor(np.log10(lo)))
    xticks = [(float(e), f"1e{e}") for e in range(lo_exp, 1)]
    yticks = [(v / 10, f"{v / 10:.1f}") for v in range(0, 11, 2)]
    roc_path, det_path = Path(f"{stem}_roc.png"), Path(f"{stem}_det.png")
    _draw_plot(roc_path, f"ROC {title}".strip(), "FAR (false-accept rate, log scale)", "TAR", roc_curves, xticks,
               yticks, (float(lo_exp), 0.0), (0.0, 1.0), roc_marks,
               [[(np.log10(PLOT_FAR), 0.0), (np.log10(PLOT_FAR), 1.0)]])
    det_vals = [v for v in (1e-4, 1e-3, 1e-2, 0.05, 0.2, 0.5, 0.8, 0.95) if v >= 10.0 ** lo_exp]
    ticks = [(float(_probit(v)[0]), f"{v:g}") for v in det_vals]
    rng = (float(_probit(det_vals[0])[0]), float(_probit(0.95)[0]))
    _draw_plot(det_path, f"DET {title}".strip(), "FAR (normal deviate scale)", "FRR", det_curves, ticks, ticks, rng,
               rng, det_marks, [[(rng[0], rng[0]), (rng[1], rng[1])]])
    return [roc_path, det_path]


def write_result(out: str | Path, result: dict, curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "",
                 ) -> list[Path]:
    """An `evaluate` verb's output files: `result` as JSON at `out`, and its ROC and DET plots beside it
    (`<out stem>_roc.png`, `<out stem>_det.png`, see `write_roc_det`). Returns the plot paths."""
    import json

    out = Path(out).expanduser()
    plots = write_roc_det(out.with_suffix(""), curves, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "plots": [str(p) for p in plots]}, indent=2, default=float))
    return plots
