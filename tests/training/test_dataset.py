import numpy as np
import pytest
import torch

from pronet_wsi.errors import InputError
from pronet_wsi.training.dataset import (
    AugmentConfig,
    PatchDataset,
    Sample,
    _dihedral,
    _dihedral_points,
    make_patch,
)
from pronet_wsi.training.inputs import load_items


def _sample(nuclei):
    image, labels, centers_rc = nuclei
    pts_xy = centers_rc[:, ::-1].copy()
    cells = labels.astype(np.int32) - 1  # the instances stand in for Voronoi cells
    v = np.full(labels.shape, 2, np.uint8)
    k = np.where(labels > 0, 1, 0).astype(np.uint8)
    return Sample("syn", image, pts_xy, v, k, cells, pred_mask=labels > 0)


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("flip", [False, True])
def test_dihedral_points_match_array_transform(k, flip):
    a = np.zeros((16, 16), int)
    a[3, 11] = 1
    b = _dihedral(a, k, flip)
    np.testing.assert_array_equal(np.argwhere(b)[0], _dihedral_points(np.array([[3.0, 11.0]]), k, flip, 16)[0])


def test_patch_targets_are_consistent_after_augmentation(nuclei):
    s = _sample(nuclei)
    mean, std = np.array([128.0] * 3, np.float32), np.array([50.0] * 3, np.float32)
    for seed in range(6):
        p = make_patch(s, np.random.default_rng(seed), 128, 6.0, AugmentConfig(), mean, std)
        heat, off, mask = p["heatmap"].numpy(), p["offsets"].numpy(), p["offset_mask"].numpy()
        assert p["image"].shape == (3, 128, 128) and p["image"].dtype.is_floating_point
        assert mask.any()
        # every offset vote lands near a heatmap peak (a point)
        rr, cc = np.nonzero(mask)
        votes = np.stack([rr + off[0, rr, cc], cc + off[1, rr, cc]], 1)
        inside = ((votes >= 0) & (votes <= 127)).all(1)
        vr, vc = np.rint(votes[inside]).astype(int).T
        assert (heat[vr, vc] > 0.6).mean() > 0.95
        # the cluster label (foreground = nuclei) agrees with the mask under the same transform
        assert (p["cluster"].numpy()[mask] == 1).mean() > 0.95


def test_dataset_is_deterministic_per_epoch(nuclei):
    ds = PatchDataset([_sample(nuclei)], 96, 4, 6.0, (0.5,) * 3, (0.2,) * 3, seed=1)
    a = ds[2]["image"]
    assert (ds[2]["image"] == a).all()
    ds.epoch = 1
    assert not (ds[2]["image"] == a).all()
    assert len(ds) == 4


def test_load_items_errors(tmp_path):
    with pytest.raises(InputError, match="exactly one"):
        load_items(tmp_path)
    with pytest.raises(InputError, match="no images"):
        load_items(tmp_path, points=tmp_path)


def _rotated_sample(s, k, flip):
    n = s.image.shape[0]
    pts_rc = _dihedral_points(s.points_xy[:, ::-1], k, flip, n)
    return Sample("rot", np.ascontiguousarray(_dihedral(s.image, k, flip)), pts_rc[:, ::-1].copy(),
                  *(np.ascontiguousarray(_dihedral(a, k, flip)) for a in (s.voronoi, s.cluster, s.cells)),
                  pred_mask=np.ascontiguousarray(_dihedral(s.pred_mask, k, flip)))


@pytest.mark.parametrize(("k", "flip"), [(1, False), (2, True), (3, False)])
def test_sample_of_transformed_image_is_transformed_sample(nuclei, k, flip):
    """Without random augmentation, the targets of a rotated/flipped image are the rotated/flipped targets
    (offset vectors rotated with them). Points sit off exact half pixels: the heatmap rounds to the nearest pixel,
    and a tie rounds to even, which no flip preserves."""
    s = _sample(nuclei)
    s.points_xy = s.points_xy + 0.01
    plain = AugmentConfig(dihedral=False, scale_range=(1.0, 1.0), gain=0, bias=0, hed_scale=0, hed_shift=0,
                          lowres_prob=0)
    zero, one = np.zeros(3, np.float32), np.ones(3, np.float32)
    a = make_patch(s, np.random.default_rng(0), 256, 6.0, plain, zero, one)
    b = make_patch(_rotated_sample(s, k, flip), np.random.default_rng(0), 256, 6.0, plain, zero, one)
    for key in ("voronoi", "cluster", "offset_mask"):
        assert np.array_equal(_dihedral(a[key].numpy(), k, flip), b[key].numpy()), key
    np.testing.assert_allclose(_dihedral(a["heatmap"].numpy(), k, flip), b["heatmap"].numpy(), atol=1e-5)
    img_a = np.moveaxis(a["image"].numpy(), 0, -1)
    np.testing.assert_allclose(_dihedral(img_a, k, flip), np.moveaxis(b["image"].numpy(), 0, -1), atol=1e-4)
    # offsets: rotate the field's positions, then its vectors (dy, dx) -> (-dx, dy) per turn, dx -> -dx on flip
    dy, dx = (_dihedral(c, k, flip) for c in a["offsets"].numpy())
    # the vectors transform like the points: apply the same map to (dy, dx) as a displacement
    for _ in range(k):
        dy, dx = -dx, dy
    if flip:
        dx = -dx
    np.testing.assert_allclose(np.stack([dy, dx]), b["offsets"].numpy(), atol=1e-4)


def test_stain_and_lowres_jitter_keep_image_and_targets_aligned(nuclei):
    s = _sample(nuclei)
    aug = AugmentConfig(hed_scale=0.1, hed_shift=0.02, lowres_prob=1.0, lowres_range=(2.0, 2.5))
    zero, one = np.zeros(3, np.float32), np.ones(3, np.float32)
    for seed in range(4):
        p = make_patch(s, np.random.default_rng(seed), 128, 6.0, aug, zero, one)
        grey = p["image"].numpy().mean(0)
        fg = p["cluster"].numpy() == 1
        assert fg.any() and (~fg).any()
        assert grey[fg].mean() < grey[~fg].mean() - 30  # nuclei are still where the labels say
        assert 0 <= grey.min() and grey.max() <= 255
    plain = make_patch(s, np.random.default_rng(0), 128, 6.0, AugmentConfig(lowres_prob=0.0), zero, one)
    blurred = make_patch(s, np.random.default_rng(0), 128, 6.0, aug, zero, one)
    assert np.abs(np.diff(blurred["image"].numpy(), axis=2)).mean() < np.abs(np.diff(plain["image"].numpy(),
                                                                                       axis=2)).mean()


def test_a_few_small_crops_still_fill_a_batch(nuclei):
    """Three 256 px crops at 8 patches per Mpx are 3 patches: the epoch is padded to one batch of 4."""
    samples = [_sample(nuclei)] * 3
    ds = PatchDataset(samples, 96, 8, 6.0, (0.5,) * 3, (0.2,) * 3, by_area=True, min_patches=4)
    assert len(ds) == 4 and sorted(ds.index.tolist()) == [0, 0, 1, 2]
    loader = torch.utils.data.DataLoader(ds, batch_size=4, drop_last=True)
    assert len(list(loader)) == 1


def test_unmatched_images_and_points_are_listed(tmp_path, caplog):
    """Issue 17 row 10: images without points and points without images are an error, or with drop_unmatched
    a warning naming them; never silent."""
    from PIL import Image

    from pronet_wsi.synthetic import synthetic_nuclei

    img = synthetic_nuclei((64, 64), 4)[0]
    for name in ("a", "b"):
        Image.fromarray(img).save(tmp_path / f"{name}.png")
    (tmp_path / "a.csv").write_text("x,y\n10,10\n30,30\n")
    (tmp_path / "orphan.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    with pytest.raises(InputError, match=r"1 image\(s\) without a points file \(b\.png\).*orphan\.geojson"):
        load_items(tmp_path, points=tmp_path)
    with caplog.at_level("WARNING"):
        items = load_items(tmp_path, points=tmp_path, drop_unmatched=True)
    assert [it[0] for it in items] == ["a"]
    assert "b.png" in caplog.text and "orphan.geojson" in caplog.text
