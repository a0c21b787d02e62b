"""Metrics: hand-computed cases, conventions, and agreement with a naive per-object reference on MoNuSeg."""

from __future__ import annotations

import numpy as np
import pytest

from pronet_wsi.images import read_labels
from pronet_wsi.metrics import (
    ImageScores,
    evaluate_image,
    evaluate_images,
    mean_scores,
    overlap_table,
)


def row(values: list[int]) -> np.ndarray:
    """A (1, W) instance map: hand cases are easiest to count on one row of pixels."""
    return np.array([values], dtype=np.int32)


def check(scores: ImageScores, **expected: float) -> None:
    for name, value in expected.items():
        assert getattr(scores, name) == pytest.approx(value, abs=1e-12), name


# --- hand-computed cases ------------------------------------------------------------------------------------

def test_three_objects_with_a_miss_and_a_false_positive():
    # index:  0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15
    gt = row([1, 1, 1, 1, 0, 2, 2, 2, 2, 2, 2, 0, 3, 3, 0, 0])   # |G1|=4 |G2|=6 |G3|=2, total 12
    pred = row([1, 1, 1, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 5])  # |S1|=3 |S2|=4 |S5|=1, total 8
    # G1&S1 = 3, G2&S2 = 4, G3 and S5 overlap nothing.
    # pixel Dice = 2*7 / (12+8) = 0.7
    # object Dice, GT side: (4/12)*(2*3/7) + (6/12)*(2*4/10) + (2/12)*0 = 24/35
    #              pred side: (3/8)*(6/7) + (4/8)*(8/10) + (1/8)*0 = 101/140
    #              -> 0.5 * (24/35 + 101/140) = 197/280
    # AJI: (3 + 4) / (4 + 6 + |G3| 2 + unused |S5| 1) = 7/13
    # PQ: IoU 3/4 and 4/6 both > 0.5 -> TP 2, FP 1 (S5), FN 1 (G3); DQ = 2/3, SQ = (3/4 + 2/3)/2 = 17/24,
    #     PQ = 17/36
    s = evaluate_image(gt, pred)
    check(s, pixel_dice=0.7, object_dice=197 / 280, aji=7 / 13, dq=2 / 3, sq=17 / 24, pq=17 / 36)
    assert (s.n_gt, s.n_pred) == (3, 3)


def test_over_segmentation():
    gt = row([1, 1, 1, 1, 1, 1, 1, 1, 0])    # |G1| = 8
    pred = row([1, 1, 1, 1, 1, 2, 2, 2, 0])  # |S1| = 5, |S2| = 3
    # pixel Dice = 2*8 / 16 = 1
    # object Dice, GT side: S*(G1) = S1, Dice = 10/13 (weight 1)
    #              pred side: (5/8)*(10/13) + (3/8)*(2*3/11) = 98/143 -> 0.5 * (110/143 + 98/143) = 8/11
    # AJI: max IoU for G1 is S1 (5/8): 5 / (8 + unused |S2| 3) = 5/11
    # PQ: S1 IoU 5/8 > 0.5 -> TP 1, FP 1, FN 0; DQ = 1/1.5 = 2/3, SQ = 5/8, PQ = 5/12
    s = evaluate_image(gt, pred)
    check(s, pixel_dice=1.0, object_dice=8 / 11, aji=5 / 11, dq=2 / 3, sq=5 / 8, pq=5 / 12)


def test_under_segmentation():
    gt = row([1, 1, 1, 1, 2, 2, 2, 2, 2, 2])    # |G1| = 4, |G2| = 6
    pred = row([7, 7, 7, 7, 7, 7, 7, 7, 7, 7])  # |S7| = 10 covers both
    # object Dice, GT side: (4/10)*(8/14) + (6/10)*(12/16) = 19/28
    #              pred side: G*(S7) = G2 (6 > 4), Dice 12/16 = 21/28 -> 0.5 * 40/28 = 5/7
    # AJI: both GT objects pair with S7 and each union counts: (4 + 6) / (10 + 10) = 0.5
    # PQ: only G2 has IoU 6/10 > 0.5 -> TP 1, FP 0, FN 1; DQ = 2/3, SQ = 0.6, PQ = 0.4
    s = evaluate_image(gt, pred)
    check(s, pixel_dice=1.0, object_dice=5 / 7, aji=0.5, dq=2 / 3, sq=0.6, pq=0.4)


def test_ties_go_to_the_smallest_id():
    gt = row([1, 1, 1, 1, 0, 0])    # |G1| = 4
    pred = row([3, 3, 4, 4, 4, 4])  # |S3| = 2, |S4| = 4; both intersect G1 in 2 pixels
    # object Dice, GT side: tie -> S3, Dice 2*2/6 = 2/3 (S4 would give 1/2)
    #              pred side: (2/6)*(2/3) + (4/6)*(2*2/8) = 5/9 -> 0.5 * (2/3 + 5/9) = 11/18
    # AJI: IoU(G1,S3) = 2/4 > IoU(G1,S4) = 2/6 -> 2 / (4 + unused |S4| 4) = 1/4
    # PQ: no IoU > 0.5 -> 0
    s = evaluate_image(gt, pred)
    check(s, object_dice=11 / 18, aji=0.25, pq=0.0, dq=0.0, sq=0.0, pixel_dice=2 * 4 / (4 + 6))


def test_empty_prediction_scores_zero():
    gt = row([1, 1, 0, 2, 2])
    s = evaluate_image(gt, np.zeros_like(gt))
    # one side empty -> 0 by convention (pixel Dice is 2*0/(4+0) = 0 by its formula too)
    check(s, object_dice=0.0, pixel_dice=0.0, aji=0.0, pq=0.0, dq=0.0, sq=0.0)
    assert (s.n_gt, s.n_pred) == (2, 0)


def test_empty_ground_truth_scores_zero():
    pred = row([0, 4, 4, 0, 0])
    s = evaluate_image(np.zeros_like(pred), pred)
    check(s, object_dice=0.0, pixel_dice=0.0, aji=0.0, pq=0.0, dq=0.0, sq=0.0)
    assert (s.n_gt, s.n_pred) == (0, 1)


def test_both_empty_scores_one():
    empty = np.zeros((4, 5), np.uint16)
    check(evaluate_image(empty, empty), object_dice=1.0, pixel_dice=1.0, aji=1.0, pq=1.0, dq=1.0, sq=1.0)


def test_no_overlap_at_all_scores_zero():
    gt, pred = row([1, 1, 0, 0]), row([0, 0, 2, 2])
    check(evaluate_image(gt, pred), object_dice=0.0, pixel_dice=0.0, aji=0.0, pq=0.0)


# --- table and conventions ----------------------------------------------------------------------------------

def test_overlap_table_counts():
    gt = row([1, 1, 1, 1, 0, 2, 2, 2])
    pred = row([5, 5, 9, 0, 0, 9, 9, 0])
    t = overlap_table(gt, pred)
    assert t.gt_ids.tolist() == [1, 2] and t.pred_ids.tolist() == [5, 9]
    assert t.gt_areas.tolist() == [4, 3] and t.pred_areas.tolist() == [2, 3]
    pairs = {(int(t.gt_ids[g]), int(t.pred_ids[p])): int(n)
             for g, p, n in zip(t.gt_index, t.pred_index, t.intersection, strict=True)}
    assert pairs == {(1, 5): 2, (1, 9): 1, (2, 9): 2}


def test_ids_need_not_be_consecutive_and_dtype_does_not_matter(nuclei):
    _, labels, _ = nuclei
    pred = np.roll(labels, 3, axis=1)
    reference = evaluate_image(labels, pred)
    # same ordering of ids, huge and sparse (takes the np.unique path), other dtypes
    big_gt = labels.astype(np.int64) * 10_000_019
    big_pred = pred.astype(np.uint64) * 7_000_003
    assert evaluate_image(big_gt, big_pred) == reference
    assert evaluate_image(labels.astype(np.uint16), pred.astype(np.int32)) == reference
    assert 0.0 < reference.aji < reference.object_dice < 1.0


def test_inputs_are_not_modified(nuclei):
    _, labels, _ = nuclei
    pred = np.roll(labels, 2, axis=0)
    before_gt, before_pred = labels.copy(), pred.copy()
    evaluate_image(labels, pred)
    assert np.array_equal(labels, before_gt) and np.array_equal(pred, before_pred)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        evaluate_image(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(ValueError, match="negative"):
        evaluate_image(np.full((2, 2), -1), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="integer"):
        evaluate_image(np.zeros((2, 2), float), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="2-D"):
        evaluate_image(np.zeros((2, 2, 3), int), np.zeros((2, 2, 3), int))


def test_mean_over_images_weighs_each_image_equally():
    a = evaluate_image(row([1, 1, 0]), row([1, 1, 0]))   # all 1.0
    b = evaluate_image(row([1, 1, 0]), row([0, 0, 0]))   # all 0.0
    per_image, mean = evaluate_images([(row([1, 1, 0]), row([1, 1, 0])), (row([1, 1, 0]), row([0, 0, 0]))])
    assert per_image == [a, b]
    check(mean, object_dice=0.5, pixel_dice=0.5, aji=0.5, pq=0.5)
    assert (mean.n_gt, mean.n_pred) == (2, 1)
    with pytest.raises(ValueError):
        mean_scores([])


# --- real data against a naive reference --------------------------------------------------------------------

def naive_scores(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Deliberately naive metrics: one boolean mask per object, Python loops, straight from the papers."""
    gt_ids = [int(i) for i in np.unique(gt) if i != 0]
    pred_ids = [int(j) for j in np.unique(pred) if j != 0]
    gt_masks = {i: gt == i for i in gt_ids}
    pred_masks = {j: pred == j for j in pred_ids}

    fg_gt, fg_pred = gt > 0, pred > 0
    pixel = 2 * np.logical_and(fg_gt, fg_pred).sum() / (fg_gt.sum() + fg_pred.sum())

    def glas_side(a_masks, b_map, b_masks):
        total = sum(int(m.sum()) for m in a_masks.values())
        acc = 0.0
        for a in a_masks.values():
            best_inter, best_dice = 0, 0.0
            for k in np.unique(b_map[a]):  # ascending: strict '>' keeps the smallest id on ties
                if k == 0:
                    continue
                inter = int(np.logical_and(a, b_masks[int(k)]).sum())
                if inter > best_inter:
                    best_inter = inter
                    best_dice = 2 * inter / (a.sum() + b_masks[int(k)].sum())
            acc += a.sum() / total * best_dice
        return acc

    object_dice = 0.5 * (glas_side(gt_masks, pred, pred_masks) + glas_side(pred_masks, gt, gt_masks))

    inter_sum, union_sum, used = 0, 0, set()
    tp, iou_sum = 0, 0.0
    for g in gt_masks.values():
        best_iou, best_j, best_inter, best_union = 0.0, None, 0, int(g.sum())
        for k in np.unique(pred[g]):
            if k == 0:
                continue
            s = pred_masks[int(k)]
            inter = int(np.logical_and(g, s).sum())
            union = int(np.logical_or(g, s).sum())
            if inter / union > best_iou:
                best_iou, best_j, best_inter, best_union = inter / union, int(k), inter, union
            if inter / union > 0.5:
                tp += 1
                iou_sum += inter / union
        inter_sum += best_inter
        union_sum += best_union
        if best_j is not None:
            used.add(best_j)
    union_sum += sum(int(m.sum()) for j, m in pred_masks.items() if j not in used)
    aji = inter_sum / union_sum
    dq = tp / (tp + 0.5 * (len(pred_ids) - tp) + 0.5 * (len(gt_ids) - tp))
    sq = iou_sum / tp
    return {"pixel_dice": pixel, "object_dice": object_dice, "aji": aji, "pq": dq * sq, "dq": dq, "sq": sq}


def monuseg_labels(monuseg_dir, n: int = 2) -> list[np.ndarray]:
    paths = sorted((monuseg_dir / "labels").glob("*.png"))[:n]
    return [read_labels(p) for p in paths]


@pytest.mark.data
def test_monuseg_label_against_itself_is_perfect(monuseg_dir):
    for labels in monuseg_labels(monuseg_dir):
        s = evaluate_image(labels, labels)
        check(s, object_dice=1.0, pixel_dice=1.0, aji=1.0, pq=1.0, dq=1.0, sq=1.0)
        assert s.n_gt == s.n_pred == len(np.unique(labels)) - 1 > 100


def edited_copy(labels: np.ndarray) -> np.ndarray:
    """Shift by 2 px, drop every 9th object, merge every 13th object into its successor."""
    pred = np.roll(labels, 2, axis=0).copy()
    ids = np.unique(pred)[1:]
    pred[np.isin(pred, ids[::9])] = 0
    for i in ids[::13]:
        pred[pred == i] = i + 1
    return pred


@pytest.mark.data
@pytest.mark.parametrize("make_pred", [lambda lab: np.roll(lab, 2, axis=1), edited_copy], ids=["shift", "edited"])
def test_monuseg_shifted_matches_naive_reference(monuseg_dir, make_pred):
    for labels in monuseg_labels(monuseg_dir):
        gt = labels[:400, :400]  # a crop keeps the naive reference to a fraction of a second
        pred = make_pred(gt)
        fast = evaluate_image(gt, pred)
        slow = naive_scores(gt, pred)
        for name, value in slow.items():
            assert getattr(fast, name) == pytest.approx(value, abs=1e-9), name
        assert 0.3 < fast.aji < 0.95
