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
