import json
import os
import time

import numpy as np
import pytest
import shapely
import torch
from PIL import Image
from wsi_fakes import (
    DarkBlobModel,
    OracleModel,
    blob_slide,
    block_labels,
    check_qupath_geojson,
    cli_run,
    small_slide,
    tiny_model_dir,
    write_oracle_slide,
)

from pronet_wsi.errors import InputError
from pronet_wsi.export import read_geojson
from pronet_wsi.inference import InferenceConfig, Predictor
from pronet_wsi.model import ModelConfig, PRONet
from pronet_wsi.slide import write_pyramid_tiff
from pronet_wsi.tiling import TilingConfig
from pronet_wsi.wsi.pipeline import SegmentConfig, segment_slide

CFG = SegmentConfig(tiling=TilingConfig(256, 48), use_tissue_mask=False, batch_size=2, workers=2)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    _, labels = block_labels((600, 700), block=256, per_block=40, seed=4)
    return write_oracle_slide(tmp_path_factory.mktemp("s") / "slide.tif", labels)


@pytest.fixture(scope="module")
def reference(slide, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    res = segment_slide(slide, out, OracleModel(), CFG)
    return res, res.geojson.read_bytes()


def test_outputs_and_run_record(reference, slide):
    res, data = reference
    out = res.geojson.parent
    assert res.status == "done" and res.n_nuclei > 200 and res.n_tiles == 20
    fc = read_geojson(res.geojson)
    assert check_qupath_geojson(fc, (600, 700)) == res.n_nuclei
    assert (out / "slide_overlay.png").exists() and not (out / ".slide.parts").exists()
    record = json.loads((out / "slide.json").read_text())
    assert record["status"] == "done" and record["counts"]["nuclei"] == res.n_nuclei
    assert record["counts"]["tiles_run"] == 20 and record["counts"]["duplicates_removed"] > 0
    assert {"open_s", "tissue_s", "tiles_wall_s", "stitch_s", "export_s", "total_s"} <= set(record["timings_s"])
    assert record["config"]["segment"]["tiling"] == {"tile_px": 256, "halo_px": 48}
    assert record["versions"]["pronet_wsi"] and record["slide"]["mpp"] == 0.25
    assert sorted(p.name for p in out.iterdir()) == [".pronet-wsi-outputs", "slide.geojson", "slide.json",
                                                      "slide_overlay.png"]  # + the notes of what pronet-wsi wrote
    assert "slide" in res.summary() and "Mpx/s" in res.summary()
    assert record["output"] == {"geojson": str(out / "slide.geojson"), "record": str(out / "slide.json"),
                                "overlay": str(out / "slide_overlay.png")}  # only what was written (issue 18)


class Killed(Exception):
    pass


def test_kill_and_resume_gives_the_identical_file_without_redoing_tiles(slide, reference, tmp_path):
    _, ref_bytes = reference
    seen = []

    def kill_after_8(key):
        seen.append(key)
        if len(seen) == 8:
            raise Killed

    with pytest.raises(Killed):
        segment_slide(slide, tmp_path, OracleModel(), CFG, on_tile_done=kill_after_8)
    assert not (tmp_path / "slide.geojson").exists() and not (tmp_path / "slide.json").exists()
    assert len(list((tmp_path / ".slide.parts").glob("*.npz"))) >= 8
    model = OracleModel()
    res = segment_slide(slide, tmp_path, model, CFG)
    # (a task already running when the kill came may have finished a tile or two more)
    assert 8 <= res.n_tiles_resumed < 20 and model.tiles_seen == 20 - res.n_tiles_resumed
    assert res.geojson.read_bytes() == ref_bytes


class SlowOracle(OracleModel):
    """An oracle whose batches take a while, recording when each ends."""

    def __init__(self) -> None:
        super().__init__()
        self.ended: list[float] = []

    def predict_batch(self, tiles):
        time.sleep(0.6)  # longer than post-processing a batch
        out = super().predict_batch(tiles)
        self.ended.append(time.monotonic())
        return out


def test_a_failed_run_returns_only_when_no_tile_task_still_runs(slide, tmp_path):
    # the slide is closed when the run ends: a task still reading it then crashed the process (SIGABRT in CI)
    def kill(key):
        raise Killed

    model = SlowOracle()
    with pytest.raises(Killed):
        segment_slide(slide, tmp_path, model, CFG, on_tile_done=kill)
    returned = time.monotonic()
    time.sleep(0.5)
    assert model.ended and max(model.ended) <= returned
    assert len(model.ended) < 10  # the batches not started were cancelled


def test_parts_from_other_settings_are_not_reused(slide, reference, tmp_path):
    def kill(key):
        raise Killed

    other = SegmentConfig(tiling=TilingConfig(512, 64), use_tissue_mask=False)
    with pytest.raises(Killed):
        segment_slide(slide, tmp_path, OracleModel(), other, on_tile_done=kill)
    model = OracleModel()
    res = segment_slide(slide, tmp_path, model, CFG)
    assert res.n_tiles_resumed == 0 and model.tiles_seen == 20
    assert res.geojson.read_bytes() == reference[1]


def test_rerun_skips_a_finished_slide_unless_overwrite(slide, tmp_path):
    segment_slide(slide, tmp_path, OracleModel(), CFG)
    stamp = (tmp_path / "slide.geojson").stat().st_mtime_ns
    model = OracleModel()
    res = segment_slide(slide, tmp_path, model, CFG)
    assert res.status == "skipped" and model.tiles_seen == 0 and "--overwrite" in res.summary()
    assert (tmp_path / "slide.geojson").stat().st_mtime_ns == stamp
    res = segment_slide(slide, tmp_path, model, SegmentConfig(**{**CFG.__dict__, "overwrite": True}))
    assert res.status == "done" and model.tiles_seen == 20


@pytest.mark.parametrize("workers,batch", [(1, 1), (3, 3), (4, 7)])
def test_results_do_not_depend_on_scheduling(slide, reference, tmp_path, workers, batch):
    cfg = SegmentConfig(tiling=CFG.tiling, use_tissue_mask=False, batch_size=batch, workers=workers)
    assert segment_slide(slide, tmp_path, OracleModel(), cfg).geojson.read_bytes() == reference[1]


def test_a_dask_cluster_gives_the_same_result(slide, reference, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0",
                                  local_directory=str(tmp_path / "dask")) as cluster:
        from distributed import Client

        from pronet_wsi.wsi.cluster import DaskExecutor

        cfg = SegmentConfig(tiling=CFG.tiling, use_tissue_mask=False, batch_size=2)
        with Client(cluster) as client:
            res = segment_slide(slide, tmp_path, OracleModel(), cfg, executor=DaskExecutor(client))
    assert res.geojson.read_bytes() == reference[1]


def test_gzip_labels_and_tissue_mask_outputs(slide, reference, tmp_path):
    import zarr

    cfg = SegmentConfig(tiling=CFG.tiling, gzip=True, labels_zarr=True)
    res = segment_slide(slide, tmp_path, OracleModel(), cfg)
    assert res.geojson.name == "slide.geojson.gz"
    fc = read_geojson(res.geojson)
    assert len(fc["features"]) == len(read_geojson_bytes(reference[1])["features"])
    labels = zarr.open_array(str(tmp_path / "slide_labels.zarr"))
    assert labels.shape == (600, 700) and labels[:].max() == len(fc["features"])
    assert (tmp_path / "slide_tissue.png").exists()
    output = json.loads((tmp_path / "slide.json").read_text())["output"]
    assert sorted(output) == ["geojson", "labels", "mask", "overlay", "record"]  # no tissue GeoJSON, no table
    assert all(os.path.exists(v) for v in output.values())
    # label i is feature i: its pixels lie inside feature i's polygon
    lab = labels[:]
    for i in (1, len(fc["features"]) // 2, len(fc["features"])):
        rows, cols = np.nonzero(lab == i)
        poly = shapely.Polygon(fc["features"][i - 1]["geometry"]["coordinates"][0])
        assert poly.buffer(1).contains(shapely.MultiPoint(np.stack([cols + 0.5, rows + 0.5], 1)))


def read_geojson_bytes(data: bytes) -> dict:
    return json.loads(data)


def test_all_white_slide_is_an_empty_collection_with_a_warning(tmp_path):
    path = tmp_path / "white.tif"
    write_pyramid_tiff(path, np.full((512, 512, 3), 255, np.uint8), 0.25, compression="zlib", levels=2)
    res = segment_slide(path, tmp_path / "out", OracleModel(), SegmentConfig(tiling=CFG.tiling))
    assert res.status == "done" and res.n_nuclei == 0 and res.n_tiles == 0
    assert any("no tissue" in w for w in res.warnings)
    assert read_geojson(res.geojson) == {"type": "FeatureCollection", "features": []}


def test_unwritable_output_folder_and_bad_slide_leave_no_output(slide, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="not writable"):
        segment_slide(slide, blocker / "out", OracleModel(), CFG)
    bad = tmp_path / "bad.svs"
    bad.write_text("not a slide")
    with pytest.raises(InputError, match="bad.svs"):
        segment_slide(bad, tmp_path / "out2", OracleModel(), CFG)
    assert not any(p.suffix in (".geojson", ".json", ".png") for p in (tmp_path / "out2").iterdir())


@pytest.mark.parametrize("model_mpp", [0.25, 1.0])
def test_resampled_slides_land_in_level0_coordinates(tmp_path, model_mpp):
    rng = np.random.default_rng(0)
    centers = np.stack([rng.uniform(30, 570, 25), rng.uniform(30, 470, 25)], axis=1)
    centers = centers[np.all(np.linalg.norm(centers[:, None] - centers[None], axis=2) + np.eye(25) * 99 > 40, 1)]
    path = blob_slide(tmp_path / "blobs.tif", (500, 600), centers, radius=10.0, mpp=0.5)
    cfg = SegmentConfig(tiling=TilingConfig(256, 48), use_tissue_mask=False)
    res = segment_slide(path, tmp_path / "out", DarkBlobModel(model_mpp), cfg)
    fc = read_geojson(res.geojson)
    found = np.array([shapely.Polygon(f["geometry"]["coordinates"][0]).centroid.coords[0] for f in fc["features"]])
    assert len(found) == len(centers)
    d = np.linalg.norm(found[:, None] - centers[None], axis=2).min(axis=1)
    assert d.max() < (0.6 if model_mpp < 0.5 else 1.5)
    areas = [f["properties"]["measurements"]["Area px^2"] for f in fc["features"]]
    assert np.allclose(areas, np.pi * 100, rtol=0.12)


def test_slide_mpp_override_and_missing_mpp(tmp_path):

    _, labels = block_labels((300, 300), seed=1)
    from wsi_fakes import id_colours

    Image.fromarray(id_colours(labels)).save(tmp_path / "plain.png")
    with pytest.raises(InputError, match="--mpp"):
        segment_slide(tmp_path / "plain.png", tmp_path / "o", OracleModel(), CFG)
    res = segment_slide(tmp_path / "plain.png", tmp_path / "o", OracleModel(), CFG, mpp=0.25)
    assert res.n_nuclei > 50
    assert os.path.exists(tmp_path / "o" / "plain.geojson")


def test_a_real_network_gives_the_same_nuclei_whatever_the_batching(slide, tmp_path):
    """Same batch size: the same bytes. Another batch size: some CPUs (fp32 on AVX2) pick convolution kernels
    by batch size, so the last float bit of a few map pixels may differ; the nuclei must still agree."""

    from pronet_wsi.inference import InferenceConfig, Predictor
    from pronet_wsi.model import ModelBundle
    from pronet_wsi.postprocess import PostprocessConfig

    torch.manual_seed(0)
    net = PRONet(ModelConfig(width=0.0625, mpp=0.5)).eval()
    with torch.no_grad():
        net.head_center.bias.fill_(-0.5)
        net.head_binary.bias.fill_(0.5)
    outputs, counts = [], []
    for run, (batch, workers) in enumerate(((1, 2), (3, 3), (3, 1))):
        predictor = Predictor(ModelBundle(net, net.config, PostprocessConfig()), InferenceConfig(batch_size=batch))
        cfg = SegmentConfig(tiling=TilingConfig(256, 48), use_tissue_mask=False, batch_size=batch, workers=workers)
        res = segment_slide(slide, tmp_path / f"r{run}", predictor, cfg)
        outputs.append(res.geojson.read_bytes())
        counts.append(res.n_nuclei)
    assert counts[0] > 0 and outputs[1] == outputs[2]
    assert abs(counts[0] - counts[1]) <= 0.02 * counts[0]  # a random net sits on its thresholds: bits matter
    check_qupath_geojson(json.loads(outputs[0]), (600, 700))


def test_a_typed_model_classifies_every_nucleus_and_counts_classes(slide, reference, tmp_path):
    from wsi_fakes import TypedOracleModel, decode_ids

    from pronet_wsi.slide import open_slide
    from pronet_wsi.wsi.cohort import summary_rows, write_summary_csv

    res = segment_slide(slide, tmp_path, TypedOracleModel(), CFG)
    fc = read_geojson(res.geojson)
    assert check_qupath_geojson(fc, (600, 700), ("Even", "Odd")) == res.n_nuclei == reference[0].n_nuclei
    with open_slide(slide) as s:
        ids = decode_ids(s.read_level(0, 0, 0, (600, 700)))
    names = {"Even": 0, "Odd": 0}
    for f in fc["features"]:
        cls = f["properties"]["classification"]
        assert cls == {"name": cls["name"], "color": [10, 20, 30] if cls["name"] == "Even" else [200, 100, 0]}
        assert f["properties"]["measurements"]["Class probability"] == pytest.approx(0.95, abs=1e-3)
        names[cls["name"]] += 1
        c = shapely.Polygon(f["geometry"]["coordinates"][0]).representative_point()  # inside the nucleus
        assert (ids[int(c.y), int(c.x)] % 2 == 1) == (cls["name"] == "Odd")
    assert min(names.values()) > 50
    record = json.loads((tmp_path / "slide.json").read_text())
    assert {k: v["nuclei"] for k, v in record["classes"].items()} == names
    assert record["classes"]["Odd"]["per_mm2"] == pytest.approx(names["Odd"] / record["measurements"][
        "tissue_area_mm2"], rel=1e-3)
    write_summary_csv(tmp_path / "summary.csv", summary_rows(tmp_path))
    header, row = (tmp_path / "summary.csv").read_text().splitlines()[:2]
    assert header.endswith("n_Even,Even_per_mm2,n_Odd,Odd_per_mm2") and f",{names['Odd']}," in row


def test_a_nucleus_classifier_classes_the_nuclei_of_every_tile(slide, tmp_path):
    """The slide path hands each tile's pixels to the model's nucleus classifier: one that swaps the head's two
    classes (its only weights are on the log probabilities) turns every Odd nucleus Even and back."""
    from dataclasses import replace

    from wsi_fakes import TypedOracleModel, decode_ids

    from pronet_wsi.classify import NucleusClassifier, feature_names
    from pronet_wsi.slide import open_slide

    names = feature_names(("Even", "Odd"))
    f = len(names)
    coef = np.zeros((2, f))
    coef[0, names.index("log p(Odd)")] = coef[1, names.index("log p(Even)")] = 1.0
    model = TypedOracleModel()
    model.postprocess_config = replace(model.postprocess_config, nucleus_classifier=NucleusClassifier(
        names, 0.25, [0.0] * f, [1.0] * f, coef.tolist(), [0.0, 0.0]))
    res = segment_slide(slide, tmp_path, model, CFG)
    with open_slide(slide) as s:
        ids = decode_ids(s.read_level(0, 0, 0, (600, 700)))
    fc = read_geojson(res.geojson)
    odd = 0
    for feat in fc["features"]:
        c = shapely.Polygon(feat["geometry"]["coordinates"][0]).representative_point()
        name = feat["properties"]["classification"]["name"]
        assert (ids[int(c.y), int(c.x)] % 2 == 1) == (name == "Even")  # swapped
        odd += name == "Odd"
    assert res.n_nuclei > 100 and 50 < odd < res.n_nuclei - 50


def test_classes_from_the_neighbourhood_do_not_depend_on_the_tiling(slide, tmp_path):
    """A classifier on the neighbours' class probabilities (the share of Odd nuclei within 25 um) gives each
    nucleus the same class whatever tile holds it, once the halo covers the neighbourhood; a smaller halo warns."""
    from dataclasses import replace

    from wsi_fakes import TypedOracleModel

    from pronet_wsi.classify import NucleusClassifier, feature_names

    names = feature_names(("Even", "Odd"))
    f = len(names)
    coef = np.zeros((2, f))
    coef[1, names.index("neighbours log p(Odd)")] = 1.0
    coef[1, names.index("neighbours log p(Even)")] = -1.0
    model = TypedOracleModel()
    model.postprocess_config = replace(model.postprocess_config, nucleus_classifier=NucleusClassifier(
        names, 0.25, [0.0] * f, [1.0] * f, coef.tolist(), [0.0, -0.1]))  # a tie (half Odd) is Even

    def classes(tiling: TilingConfig, name: str) -> tuple[dict, list[str]]:
        res = segment_slide(slide, tmp_path / name, model, replace(CFG, tiling=tiling))
        out = {}
        for feat in read_geojson(res.geojson)["features"]:
            c = shapely.Polygon(feat["geometry"]["coordinates"][0]).representative_point()
            out[(round(c.x), round(c.y))] = feat["properties"]["classification"]["name"]
        return out, res.warnings

    whole, w_whole = classes(TilingConfig(1024, 160), "whole")  # one tile holds the slide
    tiled, w_tiled = classes(TilingConfig(512, 160), "tiled")
    small, w_small = classes(TilingConfig(256, 48), "small")
    assert len(whole) > 200 and 20 < sum(v == "Odd" for v in whole.values()) < len(whole) - 20
    assert tiled == whole and not any("classifier" in w for w in w_whole + w_tiled)
    assert any("nucleus classifier's neighbourhood" in w for w in w_small)


def test_an_untyped_model_writes_nucleus_and_no_class_columns(reference):
    res, _ = reference
    fc = read_geojson(res.geojson)
    assert {f["properties"]["classification"]["name"] for f in fc["features"]} == {"Nucleus"}
    assert all("Class probability" not in f["properties"]["measurements"] for f in fc["features"])
    assert json.loads((res.geojson.parent / "slide.json").read_text())["classes"] == {}


# -- issue 17 row 5: a resume continues only the same run ---------------------------------------------------------
def _killed_run(slide_path, out, model_dir, n_tiles: int = 3):
    """Segment with a real model folder and stop after ``n_tiles`` tiles (a simulated kill)."""

    seen = []

    def kill(key):
        seen.append(key)
        if len(seen) == n_tiles:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        segment_slide(slide_path, out, Predictor(model_dir, InferenceConfig()), RESUME_CFG, on_tile_done=kill)
    return len(list((out / f".{slide_path.stem}.parts").glob("*.npz")))


RESUME_CFG = SegmentConfig(tiling=TilingConfig(256, 32), workers=1)


def test_changed_thresholds_start_over_with_a_reason(tmp_path):
    import shutil

    from wsi_fakes import small_slide

    from pronet_wsi.inference import InferenceConfig, Predictor

    slide_path = small_slide(tmp_path / "s.tif", side=768, mpp=0.5)
    model = shutil.copytree(tiny_model_dir(tmp_path / "m0", mpp=0.5), tmp_path / "COPY")
    assert _killed_run(slide_path, tmp_path / "out", model) >= 3
    thr = json.loads((model / "thresholds.json").read_text())
    thr.update(center_threshold=0.45, min_area_px=25)
    (model / "thresholds.json").write_text(json.dumps(thr))
    res = segment_slide(slide_path, tmp_path / "out", Predictor(model, InferenceConfig()), RESUME_CFG)
    assert res.n_tiles_resumed == 0
    assert any("started over" in w and "postprocess" in w for w in res.warnings), res.warnings
    fresh = segment_slide(slide_path, tmp_path / "fresh", Predictor(model, InferenceConfig()), RESUME_CFG)
    assert res.n_nuclei == fresh.n_nuclei
    assert (tmp_path / "out" / "s.geojson").read_bytes() == (tmp_path / "fresh" / "s.geojson").read_bytes()
    record = json.loads((tmp_path / "out" / "s.json").read_text())
    assert record["config"]["postprocess"]["center_threshold"] == 0.45


def test_a_copied_model_folder_resumes_with_the_same_ids(tmp_path):
    import shutil

    from wsi_fakes import small_slide

    from pronet_wsi.inference import InferenceConfig, Predictor

    slide_path = small_slide(tmp_path / "s.tif", side=768, mpp=0.5)
    model = tiny_model_dir(tmp_path / "m0", mpp=0.5)
    done = _killed_run(slide_path, tmp_path / "out", model)
    copy = shutil.copytree(model, tmp_path / "elsewhere" / "copy", copy_function=shutil.copy)  # new mtimes
    res = segment_slide(slide_path, tmp_path / "out", Predictor(copy, InferenceConfig()), RESUME_CFG)
    assert res.n_tiles_resumed == done and not any("started over" in w for w in res.warnings)
    segment_slide(slide_path, tmp_path / "fresh", Predictor(model, InferenceConfig()), RESUME_CFG)
    assert (tmp_path / "out" / "s.geojson").read_bytes() == (tmp_path / "fresh" / "s.geojson").read_bytes()


def test_feature_ids_follow_model_and_settings(tmp_path, model_05):
    """Same slide, model and settings: the same ids (QuPath merges reruns); another model: new ids."""
    import shutil

    slide = small_slide(tmp_path / "s.tif", side=512, mpp=0.5)
    other = tmp_path / "other"
    shutil.copytree(model_05, other)
    thr = json.loads((other / "thresholds.json").read_text())
    thr["center_threshold"] = 0.31
    (other / "thresholds.json").write_text(json.dumps(thr))
    ids = []
    for i, m in enumerate((model_05, model_05, other)):
        out = tmp_path / f"o{i}"
        res = cli_run("segment", slide, "-o", out, "-m", m, "--tile-px", 256, "--halo-px", 32, "--quiet")
        assert res.exit_code == 0, res.output
        ids.append([f["id"] for f in json.loads((out / "s.geojson").read_text())["features"]])
    assert ids[0] and ids[0] == ids[1]
    assert not set(ids[0]) & set(ids[2])
