import numpy as np
import pytest

from pronet_wsi.errors import InputError
from pronet_wsi.training.dataset import (
    AugmentConfig,
    PatchDataset,
    Sample,
    _dihedral,
    _dihedral_points,
    load_items,
    make_patch,
)


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
