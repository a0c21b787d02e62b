import numpy as np
import pytest
import torch

from pronet_wsi.errors import InputError
from pronet_wsi.inference import (
    InferenceConfig,
    Predictor,
    _windows,
    resample_image,
    resample_labels,
    resolve_device,
    segment_image,
)
from pronet_wsi.model import ModelBundle, ModelConfig, PRONet
from pronet_wsi.postprocess import PostprocessConfig


def tiny_bundle(seed: int = 0, mpp: float = 0.25) -> ModelBundle:
    torch.manual_seed(seed)
    m = PRONet(ModelConfig(width=0.0625, mpp=mpp)).eval()
    return ModelBundle(m, m.config, PostprocessConfig())


@pytest.mark.parametrize("h,w", [(300, 300), (517, 333), (96, 1000)])
def test_window_cores_partition_the_image(h, w):
    cover = np.zeros((h, w), int)
    for r0, c0, kr0, kc0, kr1, kc1 in _windows(h, w, 128, 16):
        assert r0 <= kr0 < kr1 <= r0 + 128 and c0 <= kc0 < kc1 <= c0 + 128
        cover[kr0:kr1, kc0:kc1] += 1
    assert (cover == 1).all()


def test_windowed_prediction_matches_whole_image_in_fp32():
    bundle = tiny_bundle()
    img = np.random.default_rng(0).integers(0, 255, (300, 280, 3), dtype=np.uint8)
    whole = Predictor(bundle, InferenceConfig(amp="off", window_px=1024)).predict_image(img)
    tiled = Predictor(bundle, InferenceConfig(amp="off", window_px=192, overlap_px=64)).predict_image(img)
    assert whole["offsets"].shape == (2, 300, 280) and whole["centers"].shape == (300, 280)
    # the receptive field reaches past the 64 px overlap, so agreement is close, not exact
    assert np.abs(whole["foreground"] - tiled["foreground"]).mean() < 0.02


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
