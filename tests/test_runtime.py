"""The forward's runtime: choice rules, and OpenVINO giving PyTorch's maps and nuclei (skipped without it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pronet_wsi.errors import InputError
from pronet_wsi.export import read_geojson
from pronet_wsi.inference import InferenceConfig, Predictor
from pronet_wsi.model import ModelBundle, ModelConfig, PRONet, default_model_dir, load_model
from pronet_wsi.postprocess import PostprocessConfig
from pronet_wsi.runtime import (
    CACHE_ENV_VAR,
    ENV_VAR,
    INT8_ENV_VAR,
    INT8_FILE,
    INT8_META,
    OpenVINOForward,
    cache_dir,
    choose_runtime,
    openvino_available,
    openvino_graph,
    pad_to_stride,
    read_int8_graph,
    write_int8_graph,
)

CPU = torch.device("cpu")
needs_openvino = pytest.mark.skipif(not openvino_available(), reason='OpenVINO not installed ("pronet-wsi[fast]")')


def test_choice_auto_env_and_errors(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert choose_runtime("auto", CPU) == ("openvino" if openvino_available() else "torch")
    assert choose_runtime("auto", torch.device("cuda")) == "torch"  # CUDA stays PyTorch
    assert choose_runtime("torch", CPU) == "torch"
    monkeypatch.setenv(ENV_VAR, "torch")
    assert choose_runtime("auto", CPU) == "torch"
    monkeypatch.setenv(ENV_VAR, "tensorflow")
    with pytest.raises(InputError, match=ENV_VAR):
        choose_runtime("auto", CPU)
    with pytest.raises(InputError, match="CPU only"):
        choose_runtime("openvino", torch.device("cuda"))
    monkeypatch.setattr("pronet_wsi.runtime.openvino_available", lambda: False)
    with pytest.raises(InputError, match=r"pronet-wsi\[fast\]"):
        choose_runtime("openvino", CPU)
    with pytest.raises(ValueError, match="runtime"):
        InferenceConfig(runtime="onnx")


@pytest.mark.parametrize("stride", [16, 32])
def test_pad_to_stride_is_the_models_padding(stride):
    """Padding the uint8 tiles before normalising gives the tensor PRONet.forward pads itself."""
    rng = np.random.default_rng(0)
    for h, w in ((37, 50), (9, 70), (64, 48)):
        tiles = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float()
        ph, pw = (-h) % stride, (-w) % stride
        mode = "reflect" if h > ph and w > pw else "replicate"
        ref = torch.nn.functional.pad(x, (0, pw, 0, ph), mode=mode) if ph or pw else x
        got = torch.from_numpy(pad_to_stride(tiles, stride)).permute(0, 3, 1, 2).float()
        assert torch.equal(got, ref)


def _tiny_bundle(classes: tuple[str, ...] = (), stem_stride: int = 1) -> ModelBundle:
    torch.manual_seed(0)
    cfg = ModelConfig(width=0.125, mpp=0.25, classes=classes, stem_stride=stem_stride)
    return ModelBundle(PRONet(cfg).eval(), cfg, PostprocessConfig())


@needs_openvino
@pytest.mark.parametrize(("classes", "stem_stride"), [((), 1), (("Tumor", "Immune cells"), 1), ((), 2),
                                                      (("Tumor", "Immune cells"), 2)])
def test_openvino_maps_equal_torch_fp32(classes, stem_stride):
    bundle = _tiny_bundle(classes, stem_stride)
    if stem_stride == 2:  # a refinement that does something (it starts at zero)
        torch.nn.init.normal_(bundle.model.refine[-1].weight, std=0.1)
    rng = np.random.default_rng(1)
    tiles = rng.integers(0, 256, (3, 70, 90, 3), dtype=np.uint8)  # odd size: padded and cropped back
    ref = Predictor(bundle, InferenceConfig(device="cpu", amp="off", runtime="torch", batch_size=2))
    fast = Predictor(bundle, InferenceConfig(device="cpu", amp="off", runtime="openvino", batch_size=2))
    assert (ref.runtime, fast.runtime) == ("torch", "openvino")
    a, b = ref.predict_batch(tiles), fast.predict_batch(tiles)
    assert a.keys() == b.keys() == {"foreground", "offsets", "centers", *(["types"] if classes else [])}
    for k in a:
        assert a[k].shape == b[k].shape and b[k].dtype == np.float32
        np.testing.assert_allclose(b[k], a[k], atol=1e-4, err_msg=k)


@needs_openvino
def test_openvino_same_nuclei_on_demo_slide(tmp_path):
    """The shipped model on the demo slide: the same nuclei from both runtimes (fp32, seam-exact tiling)."""
    from pronet_wsi.tiling import TilingConfig
    from pronet_wsi.wsi.pipeline import SegmentConfig, segment_slide

    demo = Path(__file__).resolve().parents[1] / "examples" / "demo_slide.tif"
    model = default_model_dir()
    if not demo.exists() or model is None:
        pytest.skip("examples/demo_slide.tif or the shipped model is absent")
    shutil.copy(demo, tmp_path / demo.name)  # the run writes nothing beside the input, but never risk it
    demo = tmp_path / demo.name
    bundle = load_model(model)
    cfg = SegmentConfig(tiling=TilingConfig(512, bundle.config.context_px), batch_size=2)
    centroids = {}
    for runtime in ("torch", "openvino"):
        predictor = Predictor(bundle, InferenceConfig(device="cpu", amp="off", runtime=runtime, batch_size=2,
                                                      int8="off"))
        res = segment_slide(demo, tmp_path / runtime, predictor, cfg)
        feats = read_geojson(res.geojson)["features"]
        centroids[runtime] = np.array([np.mean(f["geometry"]["coordinates"][0], axis=0) for f in feats])
    a, b = centroids["torch"], centroids["openvino"]
    assert len(a) > 100
    assert abs(len(a) - len(b)) <= 0.005 * len(a)
    d = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1)).min(axis=1)
    assert (d < 1.0).mean() >= 0.99, f"{(d >= 1.0).sum()} of {len(a)} nuclei moved by >= 1 px"


def test_info_says_which_runtime_runs(monkeypatch):
    from click.testing import CliRunner

    from pronet_wsi.cli import main

    monkeypatch.delenv(ENV_VAR, raising=False)
    res = CliRunner().invoke(main, ["info"])
    assert res.exit_code == 0, res.output
    assert ("runtime: openvino" if openvino_available() else "runtime: torch") in res.output
    assert ("graph cache: " in res.output) == openvino_available()
    monkeypatch.setenv(ENV_VAR, "torch")
    assert "runtime: torch" in CliRunner().invoke(main, ["info"]).output
    monkeypatch.setenv(ENV_VAR, "nope")
    res = CliRunner().invoke(main, ["info"])
    assert res.exit_code == 1 and res.output.strip().splitlines()[-1].startswith(f"Error: {ENV_VAR}='nope'")


@needs_openvino
@pytest.mark.slow
@pytest.mark.data
def test_openvino_tiled_matches_untiled_shipped_model(tmp_path):
    """The seam acceptance of tests/test_stitching.py on the OpenVINO path, as `segment` runs it (the shipped
    model's INT8 graph; without one, bf16 where the CPU has it) with tiles cut to the tissue: nothing lost or
    doubled at seams."""
    import zarr
    from conftest import MONUSEG, require_shared
    from test_stitching import seam_report

    from pronet_wsi.images import read_image
    from pronet_wsi.postprocess import postprocess
    from pronet_wsi.slide import write_pyramid_tiff
    from pronet_wsi.tiling import TileGrid, TilingConfig
    from pronet_wsi.wsi.pipeline import SegmentConfig, segment_slide

    monuseg = require_shared(MONUSEG)
    if default_model_dir() is None:
        pytest.skip("no shipped model in models/")
    names = ["TCGA-E2-A1B5-01Z-00-DX1", "TCGA-B0-5698-01Z-00-DX1", "TCGA-21-5784-01Z-00-DX1", "TCGA-CH-5767-01Z-00-DX1"]
    imgs = [read_image(monuseg / "images" / f"{n}.tif") for n in names]
    region = np.concatenate([np.concatenate(imgs[:2], 1), np.concatenate(imgs[2:], 1)], 0)
    halo = load_model(default_model_dir()).config.context_px  # the default halo; one window holds the padded region
    predictor = Predictor(None, InferenceConfig(window_px=-(-(region.shape[0] + 4 * halo) // 32) * 32,
                                                runtime="openvino"))
    path = tmp_path / "region.tif"
    write_pyramid_tiff(path, region, predictor.mpp, tile_px=256, levels=2, compression="zlib")
    maps = predictor.predict_image(np.pad(region, ((halo, halo), (halo, halo), (0, 0)), constant_values=255))
    core = (slice(halo, halo + region.shape[0]), slice(halo, halo + region.shape[1]))
    maps = {k: v[(slice(None), *core)] if v.ndim == 3 else v[core] for k, v in maps.items()}
    untiled = postprocess(maps, predictor.postprocess_config).labels
    cfg = SegmentConfig(tiling=TilingConfig(1024, halo), labels_zarr=True)
    res = segment_slide(path, tmp_path / "out", predictor, cfg)
    tiled = zarr.open_array(str(tmp_path / "out" / "region_labels.zarr"))[:]
    grid = TileGrid(region.shape[:2], cfg.tiling, predictor.stride)
    report = seam_report(untiled, tiled, read_geojson(res.geojson)["features"], sorted({t.core.x0 for t in grid} - {0}),
                         sorted({t.core.y0 for t in grid} - {0}))
    precision = "int8" if predictor.int8_graph else predictor._fast.precision if predictor._fast else ""
    print(f"openvino {precision} tile 1024 halo {halo}: {report}")
    assert report["near_seams"] > 50
    assert report["aji"] >= 0.98, report
    assert report["lost"] == 0 and report["duplicated"] == 0, report


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.setenv(CACHE_ENV_VAR, "off")
    assert cache_dir() is None
    monkeypatch.delenv(CACHE_ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "pronet-wsi"


@needs_openvino
def test_graph_cache_hit_same_maps_damaged_and_off(monkeypatch, tmp_path):
    """A second start reads the converted graph (no conversion) and gives the first start's maps bit for bit; a
    damaged entry is converted again and replaced; other weights get their own entry; ``off`` writes nothing."""
    import pronet_wsi.runtime as rt

    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path))
    bundle = _tiny_bundle(stem_stride=2)
    names = ("foreground", "offsets", "centers")
    args = (bundle.model, bundle.config.mean, bundle.config.std)
    tiles = np.random.default_rng(0).integers(0, 256, (1, 96, 64, 3), dtype=np.uint8)
    first = OpenVINOForward(*args, bf16=False)(tiles)
    entries = list((tmp_path / "openvino").iterdir())
    assert len(entries) == 1 and entries[0].stat().st_size > 1000

    def no_conversion(*_a, **_k):
        raise AssertionError("converted although cached")

    with monkeypatch.context() as m:
        m.setattr(rt, "openvino_graph", no_conversion)
        again = OpenVINOForward(*args, bf16=False)(tiles)
    assert all(np.array_equal(first[k], again[k]) for k in names)

    data = bytearray(entries[0].read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the weights: the checksum fails, the graph is converted again
    entries[0].write_bytes(bytes(data))
    fixed = OpenVINOForward(*args, bf16=False)(tiles)
    assert all(np.array_equal(first[k], fixed[k]) for k in names)
    assert entries[0].read_bytes() != bytes(data)

    with torch.no_grad():
        next(bundle.model.parameters()).add_(0.01)
    OpenVINOForward(*args, bf16=False)
    assert len(list((tmp_path / "openvino").iterdir())) == 2

    monkeypatch.setenv(CACHE_ENV_VAR, "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    OpenVINOForward(*args, bf16=False)
    assert not (tmp_path / "xdg").exists()


@needs_openvino
def test_streams_give_one_streams_maps_from_several_threads(monkeypatch, tmp_path):
    """Two streams (``segment``'s default) called from two threads at once give the maps of one stream bit for
    bit, so the number of streams never changes a nucleus."""
    import threading

    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path))
    bundle = _tiny_bundle(stem_stride=2)
    names = ("foreground", "offsets", "centers")
    args = (bundle.model, bundle.config.mean, bundle.config.std)
    rng = np.random.default_rng(1)
    tiles = [rng.integers(0, 256, (1, 96, 128, 3), dtype=np.uint8) for _ in range(4)]
    one = OpenVINOForward(*args, bf16=False)
    two = OpenVINOForward(*args, bf16=False, threads=2, streams=2)
    assert one.streams == 1 and two.streams == 2
    got: list = [None] * len(tiles)

    def run(i):
        got[i] = two(tiles[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(tiles))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, t in enumerate(tiles):
        ref = one(t)
        assert all(np.array_equal(ref[k], got[i][k]) for k in names)
    assert Predictor(bundle, InferenceConfig(runtime="openvino", streams=2, threads=2)).concurrency == 2
    assert Predictor(bundle, InferenceConfig(runtime="torch", streams=2)).concurrency == 1


@needs_openvino
def test_graph_cache_unwritable_folder_still_runs(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(CACHE_ENV_VAR, str(blocker))
    bundle = _tiny_bundle()
    fwd = OpenVINOForward(bundle.model, bundle.config.mean, bundle.config.std, bf16=False)
    assert fwd(np.zeros((1, 32, 32, 3), np.uint8))["foreground"].shape == (1, 32, 32)
    assert blocker.read_text() == "not a folder"


def test_graph_cache_keeps_the_most_recently_used(tmp_path):
    import os

    from pronet_wsi.runtime import _prune

    for i in range(5):
        (tmp_path / f"{i}.ovblob").write_bytes(b"x")
        os.utime(tmp_path / f"{i}.ovblob", (1000 + i, 1000 + i))
    os.utime(tmp_path / "0.ovblob", (2000, 2000))  # the oldest file, read recently
    (tmp_path / "notes.txt").write_text("not a graph")
    _prune(tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.ovblob", "3.ovblob", "4.ovblob", "notes.txt"]


@needs_openvino
def test_a_model_folders_int8_graph_runs_unless_off_or_made_for_other_weights(monkeypatch, tmp_path):
    """The INT8 graph of a model folder runs with the OpenVINO forward (its sha256 goes into the tile
    fingerprint); ``int8="off"`` and ``PRONET_WSI_INT8=off`` run the float graph; new weights saved into the
    folder make the old graph stale, ignored; a damaged graph or record is a one-line error naming the fix."""
    from pronet_wsi.model import save_model

    monkeypatch.delenv(INT8_ENV_VAR, raising=False)
    bundle = _tiny_bundle(stem_stride=2)
    folder = save_model(bundle.model, tmp_path / "m", bundle.thresholds)
    assert read_int8_graph(folder) == (None, None)
    with torch.no_grad():  # a stand-in "INT8" graph whose maps differ from the folder's float graph
        changed = PRONet(bundle.config).eval()
        changed.load_state_dict(bundle.model.state_dict())
        next(changed.parameters()).mul_(-1.0)
    sha = write_int8_graph(folder, openvino_graph(changed, bundle.config.mean, bundle.config.std), "a test")
    assert (folder / INT8_FILE).is_file() and read_int8_graph(folder)[1] == sha
    tiles = np.random.default_rng(0).integers(0, 256, (1, 96, 64, 3), dtype=np.uint8)
    runs = Predictor(folder, InferenceConfig(runtime="openvino", amp="off"))
    off = Predictor(folder, InferenceConfig(runtime="openvino", amp="off", int8="off"))
    assert runs.int8_graph == sha and off.int8_graph is None
    assert not np.allclose(runs.predict_batch(tiles)["foreground"], off.predict_batch(tiles)["foreground"])
    monkeypatch.setenv(INT8_ENV_VAR, "off")
    assert Predictor(folder, InferenceConfig(runtime="openvino")).int8_graph is None
    monkeypatch.setenv(INT8_ENV_VAR, "sometimes")
    with pytest.raises(InputError, match=INT8_ENV_VAR):
        Predictor(folder, InferenceConfig(runtime="openvino"))
    monkeypatch.delenv(INT8_ENV_VAR)
    assert Predictor(folder, InferenceConfig(runtime="torch")).int8_graph is None  # PyTorch runs its own weights

    blob = bytearray((folder / INT8_FILE).read_bytes())
    blob[-1] ^= 0xFF
    (folder / INT8_FILE).write_bytes(bytes(blob))
    with pytest.raises(InputError, match=f"{INT8_FILE}: missing or its checksum does not match"):
        Predictor(folder, InferenceConfig(runtime="openvino"))
    (folder / INT8_META).write_text("{not json")
    with pytest.raises(InputError, match=f"{INT8_META}: unreadable"):
        Predictor(folder, InferenceConfig(runtime="openvino"))
    sha = write_int8_graph(folder, openvino_graph(changed, bundle.config.mean, bundle.config.std), "a test")
    meta = json.loads((folder / INT8_META).read_text())
    (folder / INT8_META).write_text(json.dumps({k: v for k, v in meta.items() if k != "outputs"}))
    assert read_int8_graph(folder) == (None, None)  # an older version's graph (activated maps): not run
    (folder / INT8_META).write_text(json.dumps(meta))
    assert read_int8_graph(folder)[1] == sha
    save_model(changed, folder, bundle.thresholds)  # new weights in the same folder: the graph is stale
    assert read_int8_graph(folder) == (None, None)
    assert Predictor(folder, InferenceConfig(runtime="openvino")).int8_graph is None


@needs_openvino
def test_the_shipped_model_carries_a_current_int8_graph():
    """The shipped INT8 graph belongs to the shipped weights and returns this version's outputs (remade with
    ``python -m benchmarks.int8 --calib 32 --write`` after either changes), so ``segment`` runs it."""
    model = default_model_dir()
    if model is None:
        pytest.skip("no shipped model")
    graph, sha = read_int8_graph(model)
    assert graph is not None and sha is not None


@needs_openvino
def test_shipped_int8_graph_finds_the_float_models_nuclei(tmp_path):
    """The shipped model's INT8 graph (benchmarks/int8.py --write) on the demo slide against PyTorch fp32: about
    the same nuclei (validation AJI per lab within 0.005 of PyTorch fp32: benchmarks/RESULTS.md)."""
    from pronet_wsi.tiling import TilingConfig
    from pronet_wsi.wsi.pipeline import SegmentConfig, segment_slide

    demo = Path(__file__).resolve().parents[1] / "examples" / "demo_slide.tif"
    model = default_model_dir()
    if not demo.exists() or model is None or read_int8_graph(model)[0] is None:
        pytest.skip("examples/demo_slide.tif or the shipped model's INT8 graph is absent")
    shutil.copy(demo, tmp_path / demo.name)
    demo = tmp_path / demo.name
    bundle = load_model(model)
    cfg = SegmentConfig(tiling=TilingConfig(1024, bundle.config.context_px), batch_size=1)
    centroids = {}
    for runtime in ("torch", "openvino"):
        predictor = Predictor(bundle, InferenceConfig(device="cpu", amp="off", runtime=runtime))
        assert (predictor.int8_graph is not None) == (runtime == "openvino")
        res = segment_slide(demo, tmp_path / runtime, predictor, cfg)
        feats = read_geojson(res.geojson)["features"]
        centroids[runtime] = np.array([np.mean(f["geometry"]["coordinates"][0], axis=0) for f in feats])
        record = json.loads((tmp_path / runtime / f"{demo.stem}.json").read_text())
        assert record["forward"] == ("torch" if runtime == "torch" else f"openvino int8 {predictor.int8_graph[:16]}")
    a, b = centroids["torch"], centroids["openvino"]
    print(f"demo slide: {len(a)} nuclei fp32, {len(b)} INT8")
    assert len(a) > 100
    assert abs(len(a) - len(b)) <= 0.03 * len(a)
    d = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1)).min(axis=1)
    assert (d < 2.0).mean() >= 0.95, f"{(d >= 2.0).sum()} of {len(a)} nuclei moved by >= 2 px"
