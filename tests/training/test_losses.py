import math

import pytest
import torch

from pronet_wsi.training.losses import LossConfig, focal_center_loss, keep_loss, masked_bce, offset_l1, pronet_loss


def test_masked_bce_ignores_label_2_and_normalises_by_labelled_count():
    logits = torch.zeros(1, 1, 2, 2)
    label = torch.tensor([[[1, 0], [2, 2]]])
    assert masked_bce(logits, label).item() == pytest.approx(math.log(2))
    # changing an ignored pixel's logit changes nothing
    logits2 = logits.clone()
    logits2[0, 0, 1, 1] = 50.0
    assert masked_bce(logits2, label).item() == pytest.approx(math.log(2))
    assert masked_bce(logits, torch.full((1, 2, 2), 2)).item() == 0.0


def test_focal_loss_matches_hand_computation():
    logits = torch.tensor([[[[0.0, 0.0]]]])  # p = 0.5 everywhere
    heat = torch.tensor([[[1.0, 0.5]]])
    # positive: (1-p)^2 log p = 0.25 log 0.5; negative: (1-0.5)^4 p^2 log(1-p) = 0.0625 * 0.25 * log 0.5
    expected = -(0.25 * math.log(0.5) + 0.0625 * 0.25 * math.log(0.5)) / 1
    assert focal_center_loss(logits, heat).item() == pytest.approx(expected, rel=1e-5)


def test_focal_loss_lower_for_good_prediction():
    heat = torch.zeros(1, 8, 8)
    heat[0, 4, 4] = 1.0
    good = torch.full((1, 1, 8, 8), -8.0)
    good[0, 0, 4, 4] = 8.0
    bad = -good
    assert focal_center_loss(good, heat) < focal_center_loss(bad, heat)


def test_offset_l1_masked_mean():
    pred = torch.zeros(1, 2, 2, 2)
    target = torch.ones(1, 2, 2, 2)
    mask = torch.tensor([[[True, False], [False, False]]])
    assert offset_l1(pred, target, mask).item() == pytest.approx(2 / 4)


def test_pronet_loss_weights_and_offset_switch():
    out = {"foreground": torch.zeros(1, 1, 4, 4), "centers": torch.zeros(1, 1, 4, 4),
           "offsets": torch.ones(1, 2, 4, 4)}
    batch = {"voronoi": torch.ones(1, 4, 4, dtype=torch.uint8), "cluster": torch.zeros(1, 4, 4, dtype=torch.uint8),
             "heatmap": torch.zeros(1, 4, 4), "offsets": torch.zeros(1, 2, 4, 4),
             "offset_mask": torch.ones(1, 4, 4, dtype=torch.bool)}
    off = pronet_loss(out, batch, LossConfig(), use_offsets=False)
    on = pronet_loss(out, batch, LossConfig(lambda_o=3.0), use_offsets=True)
    assert off["offset"].item() == 0 and on["offset"].item() == pytest.approx(2.0)
    assert on["loss"].item() == pytest.approx(off["loss"].item() + 3 * 2.0, rel=1e-5)
    with pytest.raises(ValueError, match="lambda_b"):
        LossConfig(lambda_b=-1)


def _maps(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(2, c, 8, 8, generator=g) * 3 for k, c in (("foreground", 1), ("centers", 1), ("offsets", 2))}


def test_keep_loss_is_least_where_the_maps_agree_with_the_start_model():
    start = _maps(0)
    same = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    at_start = keep_loss(same, start)
    at_start.backward()
    assert all(float(v.grad.abs().max()) < 1e-6 for v in same.values())  # a minimum: no pull where they agree
    assert keep_loss(_maps(1), start) > at_start + 0.1
    moved = {**start, "offsets": start["offsets"] + 1.0}
    assert keep_loss(moved, start) > at_start  # offsets count where the start model sees foreground


def test_pronet_loss_adds_the_keep_term_only_with_its_weight_and_the_start_maps():
    out, start = _maps(1), _maps(0)
    batch = {"voronoi": torch.ones(2, 8, 8, dtype=torch.uint8), "cluster": torch.zeros(2, 8, 8, dtype=torch.uint8),
             "heatmap": torch.zeros(2, 8, 8), "offsets": torch.zeros(2, 2, 8, 8),
             "offset_mask": torch.ones(2, 8, 8, dtype=torch.bool)}
    plain = pronet_loss(out, batch, LossConfig(), True, start)
    kept = pronet_loss(out, batch, LossConfig(lambda_keep=2.0), True, start)
    assert "keep" not in plain and "keep" not in pronet_loss(out, batch, LossConfig(lambda_keep=2.0), True)
    assert kept["loss"].item() == pytest.approx(plain["loss"].item() + 2 * keep_loss(out, start).item(), rel=1e-5)
