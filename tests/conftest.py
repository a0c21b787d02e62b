"""Shared fixtures: synthetic nuclei, the shared real data (skipped cleanly when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pronet_wsi.synthetic import synthetic_nuclei

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MONUSEG = SHARED_DATA / "monuseg"
SLIDES = SHARED_DATA / "slides"


@pytest.fixture(scope="session", autouse=True)
def _torch_runtime():
    """Tests run the PyTorch forward unless they ask for another runtime (tests/test_runtime.py does): the
    OpenVINO conversion costs seconds per Predictor, and numbers compared across tests stay PyTorch's. Session-wide
    and before any other fixture, so Dask worker processes that module fixtures start inherit it too."""
    old = os.environ.get("PRONET_WSI_RUNTIME")
    os.environ["PRONET_WSI_RUNTIME"] = "torch"
    yield
    if old is None:
        os.environ.pop("PRONET_WSI_RUNTIME", None)
    else:
        os.environ["PRONET_WSI_RUNTIME"] = old


@pytest.fixture(scope="session", autouse=True)
def _graph_cache(tmp_path_factory):
    """Converted OpenVINO graphs go to a folder of the test session, never the user's ~/.cache."""
    old = os.environ.get("PRONET_WSI_CACHE_DIR")
    os.environ["PRONET_WSI_CACHE_DIR"] = str(tmp_path_factory.mktemp("graph-cache"))
    yield
    if old is None:
        os.environ.pop("PRONET_WSI_CACHE_DIR", None)
    else:
        os.environ["PRONET_WSI_CACHE_DIR"] = old


def require_shared(path: Path = SHARED_DATA) -> Path:
    """Skip the calling test when ../shared/data (or a file under it) is absent."""
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (tests read ../shared/data beside the checkout)")
    return path


@pytest.fixture
def monuseg_dir() -> Path:
    return require_shared(MONUSEG)


@pytest.fixture
def slides_dir() -> Path:
    return require_shared(SLIDES)


@pytest.fixture
def nuclei() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image uint8 HxWx3, labels uint32 HxW, centers_rc Nx2) on a 256x256 synthetic tile."""
    return synthetic_nuclei((256, 256), n_nuclei=40, seed=1)


@pytest.fixture(scope="session")
def model_05(tmp_path_factory) -> Path:
    """A tiny random PRONet model folder at 0.5 um/px (wsi_fakes.tiny_model_dir), shared by the session."""
    from wsi_fakes import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("model_05"), mpp=0.5)


@pytest.fixture
def image_png(tmp_path) -> Path:
    """A 96 px PNG of synthetic nuclei, alone in its folder."""
    from PIL import Image

    img, _, _ = synthetic_nuclei((96, 96), 8)
    p = tmp_path / "a.png"
    Image.fromarray(img).save(p)
    return p
