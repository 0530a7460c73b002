"""zoo.verification against independent references: brute-force threshold sweeps, pairwise AUC, hand-computed small
cases (k-fold, EER, TAR@FAR), scikit-learn's ROC, the gallery tie rule, and the ROC / DET PNG files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

from zoo.verification import (
    CALIBRATION_FOLD,
    all_pair_scores,
    auc_eer,
    best_threshold,
    calibrate_threshold,
    cosine_gallery_ranks,
    gallery_ranks,
    kfold_verification,
    pair_scores,
    rank_k,
    roc,
    tar_at_far,
    write_roc_det,
)

# same-identity scores, different-identity scores: FAR = FRR = 1/4 at a threshold in (0.5, 0.6]
SAME = [0.9, 0.8, 0.7, 0.3]
DIFF = [0.6, 0.5, 0.2, 0.1]


def small_case():
    return np.array(SAME + DIFF), np.array([True] * 4 + [False] * 4)


def random_case(n=400, seed=0):
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.3
    return np.round(rng.normal(0, 1, n) + 1.5 * same, 2), same  # rounded: ties between scores


def test_pair_scores_are_cosines():
    a, b = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[4.0, 3.0], [0.0, -2.0]])
    assert pair_scores(a, b) == pytest.approx([24 / 25, 0.0])
    emb, labels = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]]), torch.tensor([5, 5, 7])
    scores, same = all_pair_scores(emb, labels)
    assert scores == pytest.approx([1.0, 0.0, 0.0]) and same.tolist() == [True, False, False]


@pytest.mark.parametrize("balanced", [False, True])
def test_best_threshold_is_the_best_cut_of_a_brute_force_sweep(balanced):
    scores, same = random_case()
    thr, acc = best_threshold(scores, same, balanced)

    def accuracy(t):
        pred = scores >= t
        if balanced:
            return 0.5 * (pred[same].mean() + (~pred[~same]).mean())
        return (pred == same).mean()

    candidates = np.r_[np.unique(scores), np.inf]
    assert acc == pytest.approx(max(accuracy(t) for t in candidates))
    assert accuracy(thr) == pytest.approx(acc)


def test_kfold_verification_hand_computed():
    # fold 0: same 0.9, 0.6 / different 0.4, 0.7; fold 1: same 0.8, 0.5 / different 0.3, 0.55.
    scores = np.array([0.9, 0.6, 0.4, 0.7, 0.8, 0.5, 0.3, 0.55])
    same = np.array([True, True, False, False] * 2)
    folds = np.array([0] * 4 + [1] * 4)
    res = kfold_verification(scores, same, folds)
    # fold 0's threshold from fold 1: the first best cut, between 0.8 and 0.55 -> 0.675 (3/4 on fold 1);
    # on fold 0 it accepts 0.9 and 0.7: 2 of 4 right. Fold 1's from fold 0: (0.9 + 0.7) / 2 = 0.8; 3 of 4 right.
    assert res.thresholds == pytest.approx([0.675, 0.8])
    assert res.accuracies == pytest.approx([0.5, 0.75]) and res.mean == pytest.approx(0.625)
    assert res.auc == pytest.approx(roc_auc_score(same, scores))
    # calibration pairs choose a one-fold protocol's threshold and are never scored
    one = kfold_verification(np.r_[scores[:4], scores[4:]], same, np.array([0] * 4 + [CALIBRATION_FOLD] * 4))
    assert one.thresholds == pytest.approx([0.675]) and one.accuracies == pytest.approx([0.5])


def test_auc_and_roc_match_sklearn_and_a_pairwise_reference():
    scores, same = random_case()
    auc, _ = auc_eer(scores, same)
    pos, neg = scores[same], scores[~same]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert auc == pytest.approx(pairwise) and auc == pytest.approx(roc_auc_score(same, scores))
    far, tar, thr = roc(scores, same)
    ref_far, ref_tar, _ = roc_curve(same, scores, drop_intermediate=False)
    assert np.allclose(far, ref_far) and np.allclose(tar, ref_tar)
    for f, t, th in list(zip(far, tar, thr))[1:]:  # each point: the rates at `score >= threshold`
        assert f == pytest.approx((neg >= th).mean()) and t == pytest.approx((pos >= th).mean())


def test_eer_and_tar_at_far_hand_computed():
    scores, same = small_case()
    auc, eer = auc_eer(scores, same)
    assert eer == pytest.approx(0.25) and auc == pytest.approx(14 / 16)  # 0.3 is below 0.6 and 0.5: 2 of 16 pairs wrong
    assert tar_at_far(scores, same, 1e-3) == pytest.approx(0.75)  # above 0.6: no false accept, 3 of 4 accepted
    assert tar_at_far(scores, same, 0.25) == pytest.approx(0.75)
    assert tar_at_far(scores, same, 0.5) == pytest.approx(1.0)
    assert np.isnan(tar_at_far(scores[:4], same[:4])) and np.isnan(auc_eer(scores[:4], same[:4])[1])


def test_tar_at_far_matches_a_threshold_sweep():
    scores, same = random_case(seed=3)
    pos, neg = scores[same], scores[~same]
    for target in (0.0, 0.01, 0.1, 0.3):
        ok = [(pos >= t).mean() for t in np.r_[np.unique(scores), np.inf] if (neg >= t).mean() <= target]
        assert tar_at_far(scores, same, target) == pytest.approx(max(ok))


def test_calibrate_threshold_separates_two_identities():
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    thr, acc = calibrate_threshold(emb, torch.tensor([0, 0, 1, 1]))
    assert acc == 1.0 and 0.11 < thr < 0.99
    assert all(np.isnan(calibrate_threshold(emb, torch.zeros(4, dtype=torch.long))))


def test_gallery_ranks_count_ties_against_the_query():
    sim = torch.tensor([[0.9, 0.5, 0.1],   # own identity (0) first: rank 0
                        [0.7, 0.7, 0.2],   # own identity (1) ties identity 0: rank 1, not 0
                        [0.3, 0.8, 0.6],   # own (2) below identity 1: rank 1
                        [0.5, 0.5, 0.5]])  # identity 3 is not in the gallery: a miss (rank G = 3)
    ranks = gallery_ranks(sim, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2]))
    assert ranks.tolist() == [0, 1, 1, 3]
    assert rank_k(ranks, 1) == 0.25 and rank_k(ranks, 2) == 0.75 and np.isnan(rank_k(ranks[:0]))
    # two gallery entries of one identity: the better one counts, other identities' entries are counted
    sim2 = torch.tensor([[0.2, 0.6, 0.4]])
    assert gallery_ranks(sim2, torch.tensor([0]), torch.tensor([0, 0, 1])).tolist() == [0]
    # a collapsed (constant) embedding identifies nobody
    ids = torch.tensor([0, 1, 2, 0, 1, 2])
    assert rank_k(cosine_gallery_ranks(torch.ones(6, 4), ids, [0, 1, 2], [3, 4, 5])) == 0.0


def test_palm_and_hand_rank1_use_the_tie_rule():
    from models.hand.metrics import open_set_metrics
    from models.palm.metrics import rank1_identification

    # probe 3 ties its own gallery entry (identity 0, row 0) with identity 1's (row 1); argmax would call it right
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 0, 0])
    assert rank1_identification(emb, labels) == pytest.approx(1 / 2)
    assert open_set_metrics(torch.ones(6, 3), torch.tensor([0, 0, 1, 1, 2, 2]), draws=2)["rank1"] == 0.0


def test_roc_and_det_plots_are_pngs(tmp_path):
    scores, same = random_case()
    paths = write_roc_det(tmp_path / "sub" / "result", {"a": (scores, same), "b": (scores * 0.5, same),
                                                       "one kind only": (scores[same], same[same])}, "test")
    assert [p.name for p in paths] == ["result_roc.png", "result_det.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 300 and len(set(im.convert("RGB").getdata())) > 3
