import numpy as np
import pytest
import torch
from wsi_fakes import OracleModel, id_colours, write_oracle_slide

from pronet_wsi.errors import InputError
from pronet_wsi.geometry import Box
from pronet_wsi.inference import (
    InferenceConfig,
    Predictor,
    predict_tiled,
    read_tile,
    resample_image,
    resample_labels,
    resolve_device,
    segment_image,
)
from pronet_wsi.model import ModelBundle, ModelConfig, PRONet
from pronet_wsi.postprocess import PostprocessConfig
from pronet_wsi.tiling import TilingConfig


def tiny_bundle(seed: int = 0, mpp: float = 0.25) -> ModelBundle:
    torch.manual_seed(seed)
    m = PRONet(ModelConfig(width=0.0625, mpp=mpp)).eval()
    return ModelBundle(m, m.config, PostprocessConfig())


class _ColourModel:
    """Maps that are the tile's own pixels: where a tile's map lands in the image shows where it was read."""

    def predict_batch(self, tiles):
        t = tiles.astype(np.float32)
        return {"foreground": t[..., 0], "offsets": np.moveaxis(t[..., 1:], -1, 1)}


@pytest.mark.parametrize("h,w,tile_px,halo_px", [(300, 300, 128, 16), (517, 333, 160, 32), (96, 1000, 256, 96)])
def test_predict_tiled_puts_each_core_in_its_place(h, w, tile_px, halo_px):
    img = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    maps = predict_tiled(_ColourModel(), img, TilingConfig(tile_px, halo_px), batch_size=3)
    assert maps["foreground"].shape == (h, w) and maps["offsets"].shape == (2, h, w)
    np.testing.assert_array_equal(maps["foreground"], img[..., 0])
    np.testing.assert_array_equal(maps["offsets"], np.moveaxis(img[..., 1:], -1, 0))


def test_read_tile_mirrors_the_image_beyond_its_edge():
    img = np.arange(10 * 20 * 3, dtype=np.int64).reshape(10, 20, 3).astype(np.uint8)
    tile = read_tile(img, Box(-4, -2, 8, 14))
    assert tile.shape == (16, 12, 3)
    np.testing.assert_array_equal(tile[2:12, 4:], img[:, :8])
    np.testing.assert_array_equal(tile[:2, 4:], img[2:0:-1, :8])  # reflect about the edge pixel
    np.testing.assert_array_equal(tile[12:, 4:], img[8:4:-1, :8])
    np.testing.assert_array_equal(tile[2:12, :4], img[:, 4:0:-1])
    white = read_tile(img, Box(-4, -2, 8, 14), "white")
    np.testing.assert_array_equal(white[2:12, 4:], img[:, :8])
    assert (white[:2] == 255).all() and (white[12:] == 255).all() and (white[:, :4] == 255).all()
    with pytest.raises(InputError, match="beyond_edge"):
        InferenceConfig(beyond_edge="zero")


def test_tiled_prediction_equals_one_pass_of_a_real_network():
    """With the model's context as halo, the tiles' cores give the maps of one pass over the whole image."""
    bundle = tiny_bundle()
    assert bundle.config.context_px == 96
    img = np.random.default_rng(0).integers(0, 255, (300, 280, 3), dtype=np.uint8)
    whole = Predictor(bundle, InferenceConfig(amp="off", window_px=1024)).predict_image(img)
    tiled = Predictor(bundle, InferenceConfig(amp="off", window_px=256)).predict_image(img)  # 5 x 5 tiles
    assert whole["offsets"].shape == (2, 300, 280) and whole["centers"].shape == (300, 280)
    for k in whole:
        np.testing.assert_allclose(tiled[k], whole[k], atol=1e-5)


def test_window_must_hold_the_models_context():
    with pytest.raises(InputError, match="--window-px 192: must be at least 208"):
        Predictor(tiny_bundle(), InferenceConfig(window_px=192))


class _ContextOracle(OracleModel):
    """The oracle, but nucleus pixels within 8 px of white (beyond the slide) are background: maps that depend on
    context, so a tiler that fills beyond the image otherwise than a slide read, or halos too small, differs."""

    def maps(self, rgb):
        from scipy import ndimage as ndi

        maps = super().maps(rgb)
        near_white = ndi.maximum_filter((rgb == 255).all(-1), size=17, mode="constant", cval=False)
        maps["foreground"] = np.where(near_white, 0, maps["foreground"]).astype(np.float32)
        return maps

    beyond_edge = "mirror"

    def predict_image(self, image):
        return predict_tiled(self, image, TilingConfig(1024, self.context_px), 2, self.beyond_edge)


def _disk_grid(side: int, seed: int) -> np.ndarray:
    """(side, side) uint32 labels: jittered disks of radius 5-9 px on a 30 px grid, some touching, ids 1..N."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((side, side), np.uint32)
    yy, xx = np.mgrid[-10:11, -10:11]
    starts = np.arange(-5, side, 30)
    for k, (y, x) in enumerate((y, x) for y in starts for x in starts):
        cy, cx = y + rng.integers(0, 12), x + rng.integers(0, 12)
        disk = (yy**2 + xx**2) <= rng.uniform(5, 9) ** 2
        r0, c0 = max(cy - 10, 0), max(cx - 10, 0)
        r1, c1 = min(cy + 11, side), min(cx + 11, side)
        if r1 > r0 and c1 > c0:
            sub = disk[r0 - cy + 10 : r1 - cy + 10, c0 - cx + 10 : c1 - cx + 10]
            labels[r0:r1, c0:c1][sub] = k + 1
    return labels


def test_predict_of_a_large_image_equals_segment_of_it(tmp_path):
    """Acceptance (issue 18.3): ``predict`` of a 3000 x 3000 image and ``segment`` of the same pixels as a slide
    give the same nuclei, pixel for pixel (ids aside): everywhere when predict reads white beyond the image's edge
    (as segment beyond a slide), and beyond the model's context of the edge with the default mirror."""
    import zarr

    from pronet_wsi.export import read_geojson
    from pronet_wsi.wsi.pipeline import SegmentConfig, segment_slide

    labels = _disk_grid(3000, seed=3)
    path = write_oracle_slide(tmp_path / "big.tif", labels, tile_px=512)
    rgb = id_colours(labels)
    model = _ContextOracle()
    cfg = SegmentConfig(tiling=TilingConfig(1024, model.context_px), use_tissue_mask=False, labels_zarr=True)
    res = segment_slide(path, tmp_path / "out", model, cfg)
    segmented = zarr.open_array(str(tmp_path / "out" / "big_labels.zarr"))[:]
    assert res.n_nuclei == len(read_geojson(res.geojson)["features"]) > 3000
    model.beyond_edge = "white"
    _assert_same_nuclei(segment_image(rgb, model).labels, segmented, n_min=3000)
    model.beyond_edge = "mirror"
    mirrored = segment_image(rgb, model).labels
    m = model.context_px + 32  # beyond the edge band the two see the same pixels
    _assert_same_nuclei(mirrored[m:-m, m:-m], segmented[m:-m, m:-m], n_min=2500)
    # the context mattered: nuclei at the image's edge lost pixels near the white beyond it, not in the mirror
    assert (segmented > 0).sum() < (mirrored > 0).sum() <= (labels > 0).sum()


def _assert_same_nuclei(a: np.ndarray, b: np.ndarray, n_min: int) -> None:
    """The same foreground and a one-to-one map between the ids of ``a`` and ``b``, with at least ``n_min``."""
    assert ((a > 0) == (b > 0)).all()
    pairs = np.unique(np.stack([a[a > 0], b[a > 0]]), axis=1)
    n = len(np.unique(a[a > 0]))
    assert n >= n_min and pairs.shape[1] == n
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == n


def test_predict_batch_validates_input():
    p = Predictor(tiny_bundle(), InferenceConfig(amp="off"))
    with pytest.raises(ValueError, match="uint8"):
        p.predict_batch(np.zeros((1, 64, 64, 3), np.float32))
    out = p.predict_batch(np.zeros((3, 64, 64, 3), np.uint8))
    assert out["foreground"].shape == (3, 64, 64) and out["offsets"].shape == (3, 2, 64, 64)
    assert (0 <= out["centers"]).all() and (out["centers"] <= 1).all()


def test_segment_image_resamples_to_model_mpp_and_back():
    p = Predictor(tiny_bundle(mpp=0.25), InferenceConfig(amp="off"))
    img = np.random.default_rng(1).integers(0, 255, (100, 120, 3), dtype=np.uint8)
    seg = segment_image(img, p, mpp=0.5)
    assert seg.labels.shape == (100, 120)
    assert resample_image(img, 2.0).shape == (200, 240, 3)
    lab = np.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(resample_labels(resample_labels(lab, (6, 8)), (3, 4)), lab)


def test_device_errors():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(InputError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            resolve_device("cuda")


class _EquivariantOracle(torch.nn.Module):
    """Maps that commute with flips and 90-degree rotations: per-pixel colour for the probabilities and the
    central-difference gradient of a box-blurred intensity as the offset vector field."""

    def forward(self, x):
        inten = x.mean(1, keepdim=True)
        blur = torch.nn.functional.avg_pool2d(inten, 5, stride=1, padding=2, count_include_pad=False)
        pad = torch.nn.functional.pad(blur, (1, 1, 1, 1), mode="replicate")
        dy = (pad[:, :, 2:, 1:-1] - pad[:, :, :-2, 1:-1]) / 2
        dx = (pad[:, :, 1:-1, 2:] - pad[:, :, 1:-1, :-2]) / 2
        return {"foreground": -inten * 3, "offsets": torch.cat([dy, dx], 1) * 20, "centers": -blur * 2}


def test_tta_equals_plain_for_an_equivariant_model(nuclei):
    from pronet_wsi.inference import InferenceConfig, Predictor
    from pronet_wsi.model import ModelBundle, ModelConfig
    from pronet_wsi.postprocess import PostprocessConfig

    image = nuclei[0][:200, :232]  # not square: rotated views have the other shape
    bundle = ModelBundle(_EquivariantOracle(), ModelConfig(width=0.0625), PostprocessConfig())
    plain = Predictor(bundle, InferenceConfig(amp="off")).predict_image(image)
    tta = Predictor(bundle, InferenceConfig(amp="off", tta=True)).predict_image(image)
    assert np.abs(plain["offsets"]).max() > 1  # the vector field is not trivial
    for k in plain:
        np.testing.assert_allclose(tta[k], plain[k], atol=1e-4)


def test_tta_averages_views_of_a_real_network(nuclei):
    from pronet_wsi.inference import InferenceConfig, Predictor
    from pronet_wsi.model import ModelBundle, ModelConfig, PRONet
    from pronet_wsi.postprocess import PostprocessConfig

    torch.manual_seed(0)
    net = PRONet(ModelConfig(width=0.0625)).eval()
    bundle = ModelBundle(net, net.config, PostprocessConfig())
    image = nuclei[0][:128, :128]
    plain = Predictor(bundle, InferenceConfig(amp="off")).predict_image(image)
    tta = Predictor(bundle, InferenceConfig(amp="off", tta=True)).predict_image(image)
    assert not np.allclose(tta["foreground"], plain["foreground"])  # a random net is not equivariant
    mirrored = np.ascontiguousarray(image[:, ::-1])
    flipped = Predictor(bundle, InferenceConfig(amp="off", tta=True)).predict_image(mirrored)
    np.testing.assert_allclose(flipped["foreground"][:, ::-1], tta["foreground"], atol=1e-4)
    np.testing.assert_allclose(flipped["offsets"][0][:, ::-1], tta["offsets"][0], atol=1e-3)
    np.testing.assert_allclose(-flipped["offsets"][1][:, ::-1], tta["offsets"][1], atol=1e-3)


def test_predict_batch_is_one_model_call_whatever_the_window_batch(monkeypatch):
    """Tiles per call have one owner: the caller (SegmentConfig.batch_size for a slide); InferenceConfig.batch_size
    only groups predict_image's windows."""
    predictor = Predictor(tiny_bundle(), InferenceConfig(device="cpu", batch_size=1))
    calls = []
    real = predictor._maps
    monkeypatch.setattr(predictor, "_maps", lambda x: calls.append(x.shape[0]) or real(x))
    tiles = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    maps = predictor.predict_batch(tiles)
    assert calls == [3] and maps["foreground"].shape == (3, 64, 64)
    single = predictor.predict_batch(tiles[1:2])
    np.testing.assert_allclose(single["foreground"][0], maps["foreground"][1], atol=1e-5)
