"""Dask distributed: a 2-process loopback LocalCluster gives the threaded run's bytes; the model loads once a worker."""

import json

import pytest
from click.testing import CliRunner
from wsi_fakes import OracleModel, block_labels, small_slide, tiny_model_dir, write_oracle_slide

from pronet_wsi.cli import main
from pronet_wsi.errors import InputError
from pronet_wsi.inference import InferenceConfig
from pronet_wsi.tiling import TilingConfig
from pronet_wsi.wsi import cluster
from pronet_wsi.wsi.cluster import ModelSpec, local_cluster, parse_scheduler, worker_device
from pronet_wsi.wsi.cohort import SlideItem, segment_batch
from pronet_wsi.wsi.pipeline import SegmentConfig

CFG = SegmentConfig(tiling=TilingConfig(256, 48), use_tissue_mask=False, batch_size=2, workers=2)
COMMON = ["--tile-px", 256, "--halo-px", 32, "--quiet"]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """A 2-process LocalCluster on 127.0.0.1 (dashboard on a free port) and a client."""
    from distributed import Client

    with local_cluster(2, threads_per_worker=1, local_directory=str(tmp_path_factory.mktemp("dask"))) as lc, \
            Client(lc, set_as_default=False) as c:
        assert lc.scheduler_address.startswith("tcp://127.0.0.1:")
        assert all(a.startswith("tcp://127.0.0.1:") for a in c.nthreads())
        assert ":8787" not in lc.dashboard_link
        yield c


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    out = []
    for k in range(2):
        _, labels = block_labels((600, 700), block=256, per_block=40, seed=4 + k)
        out.append(write_oracle_slide(root / f"slide{k}.tif", labels))
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("model"))


def geojsons(outcomes):
    out = {}
    for o in outcomes:
        assert o.error is None, o.error
        out[o.item.stem] = o.result.geojson.read_bytes()
    return out


def test_parse_scheduler():
    assert parse_scheduler("local:3") == ("local", 3)
    assert parse_scheduler("tcp://10.0.0.1:8786") == ("address", "tcp://10.0.0.1:8786")
    for bad in ("local", "local:0", "local:x", "", "nonsense"):
        with pytest.raises(InputError, match="--scheduler"):
            parse_scheduler(bad)


def test_one_gpu_per_local_worker(monkeypatch):
    spec = ModelSpec("m", InferenceConfig(), 0.25, None, 32, pin_gpus=True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    monkeypatch.setattr(cluster, "_dask_worker_name", lambda: 3)
    assert worker_device(spec) == "cuda:1"
    assert worker_device(ModelSpec("m", InferenceConfig(device="cpu"), 0.25, None, 32, pin_gpus=True)) == "cpu"
    assert worker_device(ModelSpec("m", InferenceConfig(), 0.25, None, 32)) == "auto"
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    assert worker_device(spec) == "auto"


def damage_a_tile(src, dst):
    """Copy a slide and overwrite one level-0 tile's compressed bytes: opening and the thumbnail (level 1) still
    work, so the error comes from a tile task (on a worker)."""
    import tifffile

    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[0]
        k = len(page.dataoffsets) // 2
        off, n = page.dataoffsets[k], page.databytecounts[k]
    data[off : off + n] = b"\xff" * n
    dst.write_bytes(bytes(data))
    return dst


def test_two_slides_on_the_cluster_equal_the_threaded_run(client, slides, tmp_path):
    items = [SlideItem(p) for p in slides]
    ref = geojsons(segment_batch(items, tmp_path / "threads", OracleModel(), CFG))
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(slides[0].read_bytes()[:5000])
    damaged = damage_a_tile(slides[1], tmp_path / "damaged.tif")
    batch = [items[0], SlideItem(truncated), SlideItem(damaged), items[1]]
    outcomes = list(segment_batch(batch, tmp_path / "dask", OracleModel(), CFG, client=client))
    errors = {o.item.stem: o.error for o in outcomes if o.error}
    assert sorted(errors) == ["damaged", "truncated"] and "truncated" in errors["truncated"]
    assert "damaged.tif" in errors["damaged"] and "corrupt" in errors["damaged"]
    assert geojsons([o for o in outcomes if not o.error]) == ref and len(ref) == 2
    for name in errors:
        record = json.loads((tmp_path / "dask" / f"{name}.json").read_text())
        assert record["status"] == "failed" and f"{name}.tif" in record["error"]
        assert not (tmp_path / "dask" / f"{name}.geojson").exists()
    # both workers got tiles (of both slides: 20 tiles each, 2 per batch)
    handles = client.run(lambda: len(__import__("importlib").import_module("pronet_wsi.wsi.tile_task")._HANDLES))
    assert all(n > 0 for n in handles.values())


def test_cli_on_a_running_scheduler_loads_the_model_once_per_worker(client, slides, model_dir, tmp_path):
    args = ["segment", *slides, "-m", model_dir, *COMMON, "--mpp", 1.0]
    res = CliRunner().invoke(main, [str(a) for a in [*args, "-o", tmp_path / "threads"]])
    assert res.exit_code == 0, res.output
    address = client.scheduler.address
    res = CliRunner().invoke(main, [str(a) for a in [*args, "-o", tmp_path / "dask", "--scheduler", address]])
    assert res.exit_code == 0, res.output
    for p in slides:
        name = p.stem + ".geojson"
        assert (tmp_path / "dask" / name).read_bytes() == (tmp_path / "threads" / name).read_bytes()
    loads = client.run(lambda: list(__import__("importlib").import_module("pronet_wsi.wsi.cluster").LOADS))
    assert sorted(len(v) for v in loads.values()) == [1, 1], loads


def test_cli_local_cluster(model_dir, tmp_path):
    """--scheduler local:2 starts (and stops) its own 2-process loopback cluster."""
    paths = [small_slide(tmp_path / f"t{k}.tif", seed=k) for k in range(2)]
    args = ["segment", *paths, "-m", model_dir, *COMMON]
    res = CliRunner().invoke(main, [str(a) for a in [*args, "-o", tmp_path / "threads"]])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, [str(a) for a in [*args, "-o", tmp_path / "dask", "--scheduler", "local:2"]])
    assert res.exit_code == 0, res.output
    for p in paths:
        name = p.stem + ".geojson"
        assert (tmp_path / "dask" / name).read_bytes() == (tmp_path / "threads" / name).read_bytes()
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        res = CliRunner().invoke(main, ["segment", str(paths[0]), "-o", str(tmp_path / "x"), "-m", str(model_dir),
                                        "--scheduler", "tcp://127.0.0.1:1", "--quiet"])
    assert res.exit_code == 1 and "cannot connect" in res.output


# -- issue 17 row 9: an address where no Dask scheduler answers fails in one line, never hangs --------------------
@pytest.fixture(params=["garbage", "silent"])
def not_dask(request):
    """A local TCP server that is not Dask: one that sends a garbage header, one that waits (like HTTP)."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    conns = []

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conns.append(conn)
            if request.param == "garbage":
                conn.sendall(b"\xff" * 64)  # read by Dask as a 2**64-byte message

    threading.Thread(target=serve, daemon=True).start()
    yield f"tcp://127.0.0.1:{srv.getsockname()[1]}"
    srv.close()
    for c in conns:
        c.close()


def test_a_server_that_is_not_dask_fails_within_the_timeout(not_dask, tmp_path):
    import time

    t0 = time.monotonic()
    with pytest.raises(InputError, match="not a Dask scheduler|no Dask scheduler answered"):
        with cluster.open_client(not_dask, timeout_s=2):
            pass
    assert time.monotonic() - t0 < 10
    slide = small_slide(tmp_path / "s.tif", side=256)
    t0 = time.monotonic()
    res = CliRunner().invoke(main, ["segment", str(slide), "-o", str(tmp_path / "o"), "-m",
                                    str(tiny_model_dir(tmp_path / "m")), "--scheduler", not_dask,
                                    "--connect-timeout", "2", *map(str, COMMON)])
    assert res.exit_code != 0 and time.monotonic() - t0 < 30
    assert len([ln for ln in res.stderr.splitlines() if ln.strip()]) == 1 and "Traceback" not in res.output
    assert "--scheduler" in res.stderr and not (tmp_path / "o" / "s.geojson").exists()


def test_a_real_scheduler_passes_the_probe(client):
    cluster.probe_scheduler(client.scheduler.address, timeout_s=5)
