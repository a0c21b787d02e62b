"""Typed detection scores on hand-computable cases, and HoVer-Net's F_c against a transcription of its code."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from pronet_wsi.detection import ClassCounts, match_points, pool_scores, score_typed

CLASSES = ("epi", "inf", "spi")


def pts(*xy: tuple[float, float]) -> np.ndarray:
    return np.array(xy, np.float64).reshape(-1, 2)


def test_match_points_pairs_nearest_one_to_one():
    gt = pts((10, 10), (30, 10), (100, 100))
    pred = pts((31, 11), (11, 9), (50, 50))
    pairs = match_points(gt, pred, 3.0)
    assert pairs.tolist() == [[0, 1], [1, 0]]
    assert pairs.dtype == np.int64


def test_match_points_empty_inputs():
    assert match_points(pts(), pts((1, 1)), 3).shape == (0, 2)
    assert match_points(pts((1, 1)), pts(), 3).shape == (0, 2)
    assert match_points(np.zeros((0, 2)), np.zeros((0, 2)), 3).shape == (0, 2)
    assert match_points(pts((0, 0)), pts((10, 0)), 3).shape == (0, 2)


def test_match_points_radius_boundary_is_inclusive():
    gt = pts((0, 0))
    assert match_points(gt, pts((3, 4)), 5.0).tolist() == [[0, 0]]  # distance exactly 5
    assert match_points(gt, pts((3, 4.0001)), 5.0).shape == (0, 2)


def test_match_points_coincident_points_match():
    assert match_points(pts((5, 5), (9, 9)), pts((9, 9), (5, 5)), 1.0).tolist() == [[0, 1], [1, 0]]


def test_match_points_prefers_more_matches_within_radius():
    # gt A=0, B=10; pred P=9, Q=-1 (1-D on x). Greedy nearest would pair B-P and leave A-Q (1 apart) too;
    # the optimum is A-Q (1) + B-P (1).
    gt, pred = pts((0, 0), (10, 0)), pts((9, 0), (-1, 0))
    assert match_points(gt, pred, 2).tolist() == [[0, 1], [1, 0]]
    # chain where minimising distance alone would drop a match: A=0, B=4; P=2, Q=6 with radius 2.
    # Both A-P (2) and B-P (2) are in range; only A-P + B-Q gives two matches.
    gt, pred = pts((0, 0), (4, 0)), pts((2, 0), (6, 0))
    assert match_points(gt, pred, 2).tolist() == [[0, 0], [1, 1]]


def test_match_points_agrees_with_dense_hungarian_on_random_points():
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(0)
    for _ in range(20):
        gt = rng.uniform(0, 60, (rng.integers(0, 40), 2))
        pred = np.concatenate([gt[rng.random(len(gt)) < 0.8] + rng.normal(0, 2, (1, 2)),
                               rng.uniform(0, 60, (rng.integers(0, 10), 2))])
        radius = 4.0
        pairs = match_points(gt, pred, radius)
        if len(gt) and len(pred):
            d = cdist(gt, pred)
            cost = np.where(d <= radius, d, 1e6)
            r, c = linear_sum_assignment(cost)
            ok = cost[r, c] < 1e6
            assert len(pairs) == ok.sum()
            assert d[pairs[:, 0], pairs[:, 1]].sum() == pytest.approx(d[r[ok], c[ok]].sum())
        assert len(set(pairs[:, 0])) == len(pairs) == len(set(pairs[:, 1]))
        assert np.all(np.hypot(*(gt[pairs[:, 0]] - pred[pairs[:, 1]]).T) <= radius)


def test_match_points_rejects_bad_input():
    with pytest.raises(ValueError, match="radius_px"):
        match_points(pts((0, 0)), pts((0, 0)), 0)
    with pytest.raises(ValueError, match="gt_xy"):
        match_points(np.zeros((3, 3)), pts((0, 0)), 1)


GT = pts((10, 10), (30, 10), (50, 10), (70, 10))
GT_CLS = ["epi", "epi", "inf", "spi"]


def test_perfect():
    s = score_typed(GT, GT_CLS, GT + 1, GT_CLS, 3, CLASSES)
    assert (s.tp_d, s.fp_d, s.fn_d) == (4, 0, 0)
    assert s.f_d == s.precision_d == s.recall_d == 1.0
    assert s.type_accuracy == 1.0
    for c in s.per_class:
        assert c.precision == c.recall == c.f1 == c.f_c == 1.0
    assert s.of("epi").tp == 2 and s.of("epi").n_gt == 2
    assert s.mean_f1 == s.mean_f_c == 1.0


def test_one_miss():
    s = score_typed(GT, GT_CLS, GT[:3], GT_CLS[:3], 3, CLASSES)
    assert (s.tp_d, s.fp_d, s.fn_d) == (3, 0, 1)
    assert s.f_d == pytest.approx(6 / 7)
    spi = s.of("spi")
    assert (spi.tp, spi.fp, spi.fn, spi.fn_unmatched) == (0, 0, 1, 1)
    assert spi.precision == 0.0 and spi.recall == 0.0 and spi.f1 == 0.0 and spi.f_c == 0.0
    assert s.of("epi").f1 == 1.0
    assert s.mean_f1 == pytest.approx(2 / 3)


def test_one_wrong_class():
    pred_cls = ["epi", "inf", "inf", "spi"]  # the second epithelial nucleus called inflammatory
    s = score_typed(GT, GT_CLS, GT, pred_cls, 3, CLASSES)
    assert s.f_d == 1.0
    assert s.type_accuracy == pytest.approx(3 / 4)
    epi, inf = s.of("epi"), s.of("inf")
    assert (epi.tp, epi.fp, epi.fn, epi.fn_matched) == (1, 0, 1, 1)
    assert (inf.tp, inf.fp, inf.fn, inf.fp_matched) == (1, 1, 0, 1)
    assert epi.precision == 1.0 and epi.recall == 0.5 and epi.f1 == pytest.approx(2 / 3)
    assert inf.precision == 0.5 and inf.recall == 1.0 and inf.f1 == pytest.approx(2 / 3)
    # F_c = 2 TP / (2 TP + 2 FP + 2 FN + FP_d + FN_d): a wrong class weighs twice
    assert epi.f_c == pytest.approx(2 / (2 + 2))
    assert inf.f_c == pytest.approx(2 / (2 + 2))
    assert s.of("spi").f_c == 1.0


def test_unmatched_prediction_and_untyped():
    gt_cls = ["epi", "", "inf", "spi"]  # second click has no class: detection only
    pred = np.concatenate([GT, pts((200, 200))])
    pred_cls = ["epi", "spi", "inf", "", "epi"]  # prediction 3 has no class; 4 is a false detection
    s = score_typed(GT, gt_cls, pred, pred_cls, 3, CLASSES)
    assert (s.tp_d, s.fp_d, s.fn_d) == (4, 1, 0)
    assert s.n_typed_pairs == 3 and s.n_type_agree == 2
    epi, spi = s.of("epi"), s.of("spi")
    assert (epi.tp, epi.fp_matched, epi.fp_unmatched, epi.fn) == (1, 0, 1, 0)
    assert epi.f1 == pytest.approx(2 / 3) and epi.f_c == pytest.approx(2 / 3)
    # spi: a spindle prediction on the untyped click is ignored; the true spindle got no class -> FN matched
    assert (spi.tp, spi.fp, spi.fn_matched, spi.n_pred) == (0, 0, 1, 1)
    assert spi.f_c == 0.0


def test_empty_cases():
    s = score_typed(pts(), [], pts(), [], 3, CLASSES)
    assert s.f_d == 1.0 and s.mean_f1 == 1.0 and s.mean_f_c == 1.0
    s = score_typed(GT, GT_CLS, pts(), [], 3, CLASSES)
    assert s.f_d == 0.0 and s.precision_d == 0.0 and s.recall_d == 0.0 and s.mean_f1 == 0.0
    s = score_typed(pts(), [], GT, GT_CLS, 3, CLASSES)
    assert s.f_d == 0.0 and s.of("epi").fp_unmatched == 2 and s.mean_f_c == 0.0
    # a class absent from both sides scores 1.0 (nothing to find, nothing found)
    s = score_typed(GT[:1], ["epi"], GT[:1], ["epi"], 3, CLASSES)
    assert s.of("spi").f1 == 1.0


def test_pool_sums_counts():
    a = score_typed(GT, GT_CLS, GT, GT_CLS, 3, CLASSES)
    b = score_typed(GT, GT_CLS, GT[:3], GT_CLS[:3], 3, CLASSES)
    p = pool_scores([a, b])
    assert (p.tp_d, p.fp_d, p.fn_d) == (7, 0, 1)
    assert p.of("spi") == ClassCounts("spi", tp=1, fn_unmatched=1, n_gt=2, n_pred=1)
    with pytest.raises(ValueError, match="classes differ"):
        pool_scores([a, score_typed(GT, GT_CLS, GT, GT_CLS, 3, ("epi",))])


def test_bad_classes():
    with pytest.raises(ValueError, match="one class per point"):
        score_typed(GT, GT_CLS[:2], GT, GT_CLS, 3, CLASSES)
    with pytest.raises(ValueError, match="distinct"):
        score_typed(GT, GT_CLS, GT, GT_CLS, 3, ("epi", "epi"))


def _hovernet_f_c(true_xy, true_type, pred_xy, pred_type, radius, type_id):  # noqa: PLR0913
    """HoVer-Net's run_nuclei_type_stat for one image and one type, transcribed (exhaustive=False, -1 ignored)."""
    from scipy.optimize import linear_sum_assignment

    d = cdist(true_xy, pred_xy)
    r, c = linear_sum_assignment(d)
    ok = d[r, c] <= radius
    r, c = r[ok], c[ok]
    un_t = np.delete(np.arange(len(true_xy)), r)
    un_p = np.delete(np.arange(len(pred_xy)), c)
    pt, pp = true_type[r], pred_type[c]
    sel = (pt == type_id) | (pp == type_id)
    pt, pp = pt[sel], pp[sel]
    tp = ((pt == type_id) & (pp == type_id)).sum()
    tn = ((pt != type_id) & (pp != type_id)).sum()
    fp = ((pt != type_id) & (pp == type_id)).sum() - (pt == -1).sum()
    fn = ((pt == type_id) & (pp != type_id)).sum()
    fp_d = (pred_type[un_p] == type_id).sum()
    fn_d = (true_type[un_t] == type_id).sum()
    return 2 * (tp + tn) / (2 * (tp + tn) + 2 * fp + 2 * fn + fp_d + fn_d), 2 * len(r) / (len(r) * 2 + len(un_p)
                                                                                        + len(un_t))


def test_hovernet_pairing_can_lose_a_match():
    # nuclei at x = 8 and 16, predictions at 13 and 28, radius 3. The dense assignment pairs every prediction:
    # {8-13, 16-28} costs 5 + 12 = 17 < {8-28, 16-13} = 20 + 3, and both of its pairs are beyond the radius,
    # so HoVer-Net's pairing finds nothing while 16-13 (distance 3) is a match.
    gt, pred = pts((8, 0), (16, 0)), pts((13, 0), (28, 0))
    assert match_points(gt, pred, 3, hovernet_pairing=True).shape == (0, 2)
    assert match_points(gt, pred, 3).tolist() == [[1, 0]]


def test_f_c_equals_hovernet_code_on_random_scenes():
    rng = np.random.default_rng(1)
    names = np.array(["", "epi", "inf", "spi"], dtype=object)
    for _ in range(10):
        # well separated ground truth so the two matchings cannot differ
        grid = np.stack(np.meshgrid(np.arange(8), np.arange(8)), -1).reshape(-1, 2) * 20.0
        gt = grid[rng.random(len(grid)) < 0.7]
        keep = rng.random(len(gt)) < 0.85
        pred = np.concatenate([gt[keep] + rng.uniform(-2, 2, (keep.sum(), 2)), rng.uniform(0, 160, (4, 2)) + 10])
        gt_t = rng.choice([-1, 1, 2, 3], len(gt))  # -1 = untyped
        pred_t = rng.integers(0, 4, len(pred))  # 0 = no class
        gcls = [names[t] if t > 0 else "" for t in gt_t]
        pcls = [names[t] for t in pred_t]
        s = score_typed(gt, gcls, pred, pcls, 3.0, ("epi", "inf", "spi"), hovernet_pairing=True)
        assert len(match_points(gt, pred, 3.0)) >= s.tp_d  # the default pairing never finds fewer
        for t, name in enumerate(("epi", "inf", "spi"), start=1):
            f_c, f_d = _hovernet_f_c(gt, gt_t, pred, pred_t, 3.0, t)
            assert s.of(name).f_c == pytest.approx(f_c)
            assert s.f_d == pytest.approx(f_d)
