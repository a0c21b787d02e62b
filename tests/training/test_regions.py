"""Complete-annotation regions: slide pieces, masks, losses and the messages for bad regions."""

import json
import logging

import numpy as np
import pytest
import torch
from wsi_fakes import blob_slide

from pronet_wsi.errors import InputError
from pronet_wsi.training.dataset import AugmentConfig, Sample, make_patch
from pronet_wsi.training.inputs import load_slide_items, read_slide_list
from pronet_wsi.training.losses import LossConfig, focal_center_loss, pronet_loss
from pronet_wsi.training.points import Region, read_regions, region_mask


def _feature(geometry, object_type="annotation", name=None):
    props = {"objectType": object_type}
    if name:
        props["classification"] = {"name": name}
    return {"type": "Feature", "geometry": geometry, "properties": props}


def _rect(x0, y0, x1, y1):
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


def _write(path, *features):
    path.write_text(json.dumps({"type": "FeatureCollection", "features": list(features)}))
    return path


def test_read_regions_keeps_annotations_and_skips_detections(tmp_path):
    path = _write(tmp_path / "a.geojson", _feature(_rect(0, 0, 10, 10), name="Click here"),
                  _feature(_rect(0, 0, 5, 5), object_type="detection"),
                  _feature({"type": "MultiPoint", "coordinates": [[1, 1]]}),
                  _feature({"type": "MultiPolygon", "coordinates": [_rect(20, 20, 30, 30)["coordinates"],
                                                                    _rect(40, 40, 50, 50)["coordinates"]]}))
    regions = read_regions(path)
    assert [r.name for r in regions] == ["feature 0 (Click here)", "feature 3.0 (annotation)",
                                         "feature 3.1 (annotation)"]
    assert regions[2].bounds() == (40.0, 40.0, 50.0, 50.0)


def test_region_mask_follows_the_continuous_frame():
    # the level-0 square [2, 6) x [4, 8) covers pixels 2..5 (x) and 4..7 (y) at scale 1; at scale 2 twice that
    r = Region("r", np.array([[2.0, 4.0], [6.0, 4.0], [6.0, 8.0], [2.0, 8.0]]))
    m = region_mask(r, (0.0, 0.0), 1.0, (12, 12))
    assert m.sum() == 16 and m[4:8, 2:6].all()
    m2 = region_mask(r, (1.0, 1.0), 2.0, (20, 20))  # origin (1, 1): pixels (2-1)*2 .. (6-1)*2
    assert m2.sum() == 64 and m2[6:14, 2:10].all()
    holed = Region("h", r.exterior, (np.array([[3.0, 5.0], [5.0, 5.0], [5.0, 7.0], [3.0, 7.0]]),))
    assert region_mask(holed, (0.0, 0.0), 1.0, (12, 12)).sum() == 12


def _region_sample(nuclei):
    image, labels, centers_rc = nuclei
    region = np.zeros(labels.shape, bool)
    region[:, :100] = True
    k = np.where(labels > 0, 1, 0).astype(np.uint8)
    return Sample.in_region("syn", image, centers_rc[:, ::-1].copy(), k.copy(), k, labels.astype(np.int32) - 1,
                            region, pred_mask=labels > 0)


def test_a_sample_keeps_the_arrays_it_is_given(nuclei):
    image, labels, centers_rc = nuclei
    k = np.where(labels > 0, 1, 0).astype(np.uint8)
    cells = labels.astype(np.int32) - 1
    s = Sample("syn", image, centers_rc[:, ::-1].copy(), k, k, cells, region=np.zeros(labels.shape, bool))
    assert s.voronoi is k and s.cluster is k and s.cells is cells


def test_no_loss_outside_the_region(nuclei):
    s = _region_sample(nuclei)
    assert (s.voronoi[:, 100:] == 2).all() and (s.cells[:, 100:] == -1).all()
    assert (nuclei[1][:, 100:] > 0).any() and (s.voronoi[:, :100] == (nuclei[1][:, :100] > 0)).all()
    mean, std = np.full(3, 128.0, np.float32), np.full(3, 50.0, np.float32)
    patches = [make_patch(s, np.random.default_rng(i), 96, 6.0, AugmentConfig(), mean, std) for i in range(12)]
    for p in patches:
        valid = p["valid"].numpy()
        assert valid.any()  # sampled inside the region
        assert (p["voronoi"].numpy()[~valid] == 2).all() and (p["cluster"].numpy()[~valid] == 2).all()
        assert not p["offset_mask"].numpy()[~valid].any()
    batch = {k: torch.stack([p[k] for p in patches[:4]]) for k in patches[0]}
    out = {"foreground": torch.randn(4, 1, 96, 96, requires_grad=True),
           "centers": torch.randn(4, 1, 96, 96, requires_grad=True),
           "offsets": torch.randn(4, 2, 96, 96, requires_grad=True)}
    pronet_loss(out, batch, LossConfig(), use_offsets=True)["loss"].backward()
    outside = ~batch["valid"]
    assert outside.any()
    for name in ("foreground", "centers", "offsets"):  # not one output pixel outside a region gets a gradient
        assert out[name].grad.abs().sum(1)[outside].max() == 0
        assert out[name].grad.abs().sum(1)[~outside].max() > 0


def test_focal_loss_without_mask_is_unchanged():
    logits, heat = torch.randn(2, 1, 8, 8), torch.rand(2, 8, 8)
    heat[0, 3, 3] = 1.0
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    assert torch.allclose(focal_center_loss(logits, heat), focal_center_loss(logits, heat, valid=valid))


@pytest.fixture
def blobs(tmp_path):
    rng = np.random.default_rng(0)
    centers = np.column_stack([rng.uniform(20, 500, 60), rng.uniform(20, 300, 60)])
    return blob_slide(tmp_path / "s.tif", (320, 520), centers, 6.0, mpp=0.5), centers


def test_slide_pieces_follow_the_regions(tmp_path, blobs, caplog):
    slide, centers = blobs
    inside = (centers[:, 0] < 200) & (centers[:, 1] < 150)
    pts = tmp_path / "p.geojson"
    _write(pts, _feature({"type": "MultiPoint", "coordinates": centers.tolist()}),
           _feature(_rect(0, 0, 200, 150), name="Click here"), _feature(_rect(400, 200, 500, 300)))
    centers_outside = int((~inside & ~((centers[:, 0] > 400) & (centers[:, 1] > 200))).sum())
    with caplog.at_level(logging.WARNING):
        items = load_slide_items(slide, pts, mpp=0.5, region_px=128, margin_px=16)
    # a 200 x 150 px region at scale 1 in 128 px pieces: 2 x 2 pieces (+16 px margin each side)
    first = [it for it in items if it[0].startswith("s_r0_")]
    assert len(first) == 4 and first[0][1].shape == (128 + 32, 128 + 32, 3)
    assert sum(int(it[3].sum()) for it in first) == 200 * 150  # the pieces' masks tile the region exactly
    n_in_masks = 0
    for _, image, local, mask, _ in first:  # points in the piece frame sit on dark blob pixels
        rr, cc = np.floor(local[:, 1]).astype(int), np.floor(local[:, 0]).astype(int)
        assert (image[rr, cc].mean(1) < 120).mean() > 0.9
        n_in_masks += int(mask[rr, cc].sum())
    assert n_in_masks == int(inside.sum())
    assert f"{centers_outside} of 60 points lie outside every region" in caplog.text


def test_region_without_points_and_no_regions(tmp_path, blobs, caplog):
    slide, centers = blobs
    pts = _write(tmp_path / "p.geojson", _feature({"type": "MultiPoint", "coordinates": centers.tolist()}))
    with pytest.raises(InputError, match="no region annotations.*Export objects as GeoJSON"):
        load_slide_items(slide, pts, mpp=0.5)
    regions = _write(tmp_path / "r.geojson", _feature(_rect(0, 0, 520, 320)),
                     _feature(_rect(1, 1, 3, 3), name="empty"))  # too small to hold a blob centre
    with caplog.at_level(logging.WARNING):
        items = load_slide_items(slide, pts, mpp=0.5, region_px=1024, regions_path=regions)
    assert len(items) == 1 and len(items[0][2]) == 60
    assert "region feature 1 (empty) holds no points" in caplog.text


def test_slide_list(tmp_path):
    (tmp_path / "list.csv").write_text("slide,points,mpp\na.svs,a.geojson,0.25\nb.svs,b.geojson,\n")
    rows = read_slide_list(tmp_path / "list.csv")
    assert rows == [(tmp_path / "a.svs", tmp_path / "a.geojson", 0.25, None),
                    (tmp_path / "b.svs", tmp_path / "b.geojson", None, None)]
    (tmp_path / "bad.csv").write_text("slide,points,mpp\na.svs,a.geojson,fast\n")
    with pytest.raises(InputError, match="bad.csv:2: mpp 'fast' is not a number"):
        read_slide_list(tmp_path / "bad.csv")
    (tmp_path / "nohead.csv").write_text("a.svs,a.geojson\n")
    with pytest.raises(InputError, match="expected a header"):
        read_slide_list(tmp_path / "nohead.csv")


def _no_aug() -> AugmentConfig:
    return AugmentConfig(dihedral=False, scale_range=(1.0, 1.0), gain=0.0, bias=0.0, hue_jitter=False,
                         hed_scale=0.0, hed_shift=0.0, lowres_prob=0.0)


def _heat_peak(items) -> tuple[int, int]:
    from pronet_wsi.training.dataset import prepare_samples
    from pronet_wsi.training.pseudolabels import PseudoLabelConfig

    sample = prepare_samples(items, PseudoLabelConfig(geodesic=False), None)[0]
    side = sample.image.shape[0]
    p = make_patch(sample, np.random.default_rng(0), side, 4.0, _no_aug(), np.zeros(3, np.float32),
                   np.ones(3, np.float32))
    heat = p["heatmap"].numpy()
    assert heat.max() == pytest.approx(1.0)
    return tuple(int(v) for v in np.unravel_index(heat.argmax(), heat.shape))


def test_a_qupath_click_on_a_nucleus_centre_lands_on_its_centre_pixel(tmp_path):
    """QuPath's frame: pixel [20, 33] covers x 33-34, y 20-21, so a click on its centre is (33.5, 20.5)."""
    from PIL import Image

    from pronet_wsi.training.inputs import load_items
    from pronet_wsi.training.points import write_points_geojson

    click = np.array([[33.5, 20.5]])
    slide = blob_slide(tmp_path / "s.tif", (64, 64), click, 5.0, mpp=0.5)  # a disk centred on the click
    (tmp_path / "imgs").mkdir()
    from pronet_wsi.slide import open_slide

    with open_slide(slide) as s:
        Image.fromarray(s.read_level(0, 0, 0, (64, 64))).save(tmp_path / "imgs" / "a.png")
    write_points_geojson(tmp_path / "imgs" / "a.geojson", click)
    # an image file + QuPath points: the heatmap peak sits on the clicked pixel
    assert _heat_peak(load_items(tmp_path / "imgs", points=tmp_path / "imgs")) == (20, 33)
    # the same click on the slide, inside a region read with 16 px of margin: the pixel 16 px further on
    pts = _write(tmp_path / "p.geojson", _feature({"type": "MultiPoint", "coordinates": click.tolist()}),
                 _feature(_rect(0, 0, 64, 64)))
    items = load_slide_items(slide, pts, mpp=0.5, margin_px=16)
    assert _heat_peak(items) == (36, 49)
