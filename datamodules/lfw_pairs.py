"""The LFW verification protocol: reading `pairs.txt` and the k-fold accuracy with thresholds chosen on the other folds.

`pairs.txt` (LFW View 2) starts with a header `N F` (N folds, F pairs of each kind per fold; LFW: `10 300`), then per
fold F same-person lines `name i j` and F different-person lines `name1 i name2 j`. Image i of a person is
`<images_root>/<name>/<name>_{i:04d}.jpg`. A one-number header `F` is read as a single fold (pairsDevTrain.txt).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoo.errors import ZooError
from zoo.images import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class Pair:
    """One line of pairs.txt: two image paths, whether they show the same person, and where the line was."""

    a: Path
    b: Path
    same: bool
    fold: int
    line_no: int  # 1-based, the header is line 1
    text: str


def lfw_image(root: Path, name: str, index: int) -> Path:
    """`<root>/<name>/<name>_{index:04d}.jpg`, or the same stem with another image extension (any case) if that exists."""
    path = root / name / f"{name}_{index:04d}.jpg"
    if path.is_file():
        return path
    folder = root / name
    if folder.is_dir():
        stem = path.stem.lower()
        for p in folder.iterdir():
            if p.stem.lower() == stem and p.suffix.lower() in IMAGE_EXTENSIONS:
                return p
    return path


def read_pairs(pairs_file: str | Path, images_root: str | Path, check_files: bool = True) -> list[Pair]:
    """All pairs of a pairs.txt, in file order. Errors name the line (number and text) and say what was expected."""
    pairs_file, images_root = Path(pairs_file), Path(images_root)
    lines = pairs_file.read_text().splitlines()
    if not lines or not lines[0].split():
        raise ZooError(f"{pairs_file} is empty; expected a header 'N F' (e.g. '10 300') and then the pairs.")
    head = lines[0].split()
    try:
        n_folds, per_fold = (1, int(head[0])) if len(head) == 1 else (int(head[0]), int(head[1]))
    except ValueError:
        raise ZooError(f"{pairs_file} line 1 '{lines[0]}': expected the header 'N F' (N folds, F pairs of each kind "
                       f"per fold), e.g. '10 300'.") from None
    body = [(i + 2, ln.strip()) for i, ln in enumerate(lines[1:]) if ln.strip()]
    if len(body) != 2 * n_folds * per_fold:
        raise ZooError(f"{pairs_file}: the header '{lines[0].strip()}' announces {n_folds} folds x {per_fold} same + "
                       f"{per_fold} different pairs = {2 * n_folds * per_fold} lines, but the file has {len(body)}.")
    pairs = []
    for k, (line_no, text) in enumerate(body):
        fold, same = k // (2 * per_fold), (k % (2 * per_fold)) < per_fold
        parts = text.split()
        try:
            if same and len(parts) == 3:
                a, b = lfw_image(images_root, parts[0], int(parts[1])), lfw_image(images_root, parts[0], int(parts[2]))
            elif not same and len(parts) == 4:
                a, b = lfw_image(images_root, parts[0], int(parts[1])), lfw_image(images_root, parts[2], int(parts[3]))
            else:
                raise ValueError
        except ValueError:
            kind = "'name i j' (same person)" if same else "'name1 i name2 j' (different people)"
            raise ZooError(f"{pairs_file} line {line_no} '{text}': expected {kind} at this position (fold {fold + 1}, "
                           f"the first {per_fold} lines of each fold are same-person pairs).") from None
        if check_files:
            for p in (a, b):
                if not p.is_file():
                    raise ZooError(f"{pairs_file} line {line_no} '{text}': image {p} not found. pairs.txt must sit "
                                   f"with the LFW images it names (<root>/<name>/<name>_0001.jpg); check --data-dir "
                                   f"or that this is the pairs.txt of this dataset.")
        pairs.append(Pair(a, b, same, fold, line_no, text))
    return pairs


# ----- thresholds and k-fold accuracy -----
def best_threshold(scores: np.ndarray, same: np.ndarray, balanced: bool = False) -> tuple[float, float]:
    """The similarity threshold (same person iff score >= threshold) with the best accuracy on these pairs.

    Candidates are the midpoints between consecutive distinct scores (plus both ends). With `balanced` the accuracy is
    the mean of the true-positive and true-negative rates, i.e. the accuracy on a set with as many positive as negative
    pairs, which is what a threshold calibrated on all pairs of a split needs (negatives outnumber positives).
    Returns (threshold, accuracy).
    """
    scores, same = np.asarray(scores, dtype=np.float64), np.asarray(same, dtype=bool)
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
        acc = (tp + tn) / max(len(s), 1)
    # Only cut between distinct scores.
    valid = np.ones(len(s) + 1, dtype=bool)
    valid[1:-1] = s[:-1] != s[1:]
    acc = np.where(valid, acc, -1.0)
    t = int(np.argmax(acc))
    if len(s) == 0:
        return 0.5, 0.0
    if t == 0:
        thr = s[0] + 1e-6
    elif t == len(s):
        thr = s[-1] - 1e-6
    else:
        thr = 0.5 * (s[t - 1] + s[t])
    return float(thr), float(acc[t])


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


def kfold_verification(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> VerificationResult:
    """Accuracy on each fold at the best-accuracy threshold of the other folds (LFW's protocol), and ROC AUC.

    scores: (n,) similarities (higher = more alike); same: (n,) bool; folds: (n,) fold index of each pair.
    With a single fold the threshold is chosen on that fold itself.
    """
    from sklearn.metrics import roc_auc_score

    scores, same, folds = np.asarray(scores, dtype=np.float64), np.asarray(same, dtype=bool), np.asarray(folds)
    thresholds, accuracies = [], []
    fold_ids = np.unique(folds)
    for f in fold_ids:
        test = folds == f
        train = ~test if len(fold_ids) > 1 else test
        thr, _ = best_threshold(scores[train], same[train])
        thresholds.append(thr)
        accuracies.append(float(np.mean((scores[test] >= thr) == same[test])))
    auc = float(roc_auc_score(same, scores)) if 0 < same.sum() < len(same) else float("nan")
    return VerificationResult(thresholds, accuracies, auc)
