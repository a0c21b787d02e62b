import threading

import numpy as np

from pronet_wsi.geometry import Box, Frame
from pronet_wsi.slide import write_pyramid_tiff
from pronet_wsi.tiling import TilingConfig
from pronet_wsi.wsi.tile_task import TileJob, _thread_slide, close_slides


def test_close_slides_leaves_a_live_threads_handle_and_closes_it_once_the_thread_ends(tmp_path):
    path = tmp_path / "s.tif"
    write_pyramid_tiff(path, np.full((256, 256, 3), 200, np.uint8), 0.25, compression="zlib", levels=1)
    job = TileJob(slide_path=str(path), backend="auto", mpp=0.25, frame=Frame(1.0, (256, 256), (256, 256)),
                  tiling=TilingConfig(256, 16), match_radius_px=8.0, with_masks=False, parts_root=str(tmp_path),
                  fingerprint={})
    opened, release = [], threading.Event()

    def worker():  # a thread that holds the slide open (as if reading) until released
        opened.append(_thread_slide(job))
        release.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    while not opened:
        release.wait(0.01)
    close_slides(str(path))
    assert opened[0].read_box(Box(0, 0, 8, 8), (8, 8)).shape == (8, 8, 3)  # still open
    release.set()
    t.join()
    close_slides(str(path))
    assert opened[0]._h is None


def _run_all(tmp_path, name, path, tiles, margin):
    from wsi_fakes import OracleModel

    from pronet_wsi.wsi.tile_store import TileStore
    from pronet_wsi.wsi.tile_task import run_batch

    job = TileJob(slide_path=str(path), backend="auto", mpp=0.25, frame=Frame(1.0, (640, 640), (640, 640)),
                  tiling=TilingConfig(448, 96), match_radius_px=8.0, with_masks=False,
                  parts_root=str(tmp_path / name), fingerprint={}, post_margin_px=margin)
    stats = [s for t in tiles for s in run_batch(job, [t], OracleModel())]
    store = TileStore(tmp_path / name)
    return [store.load(t.key) for t in tiles], stats


def test_post_window_gives_the_whole_read_boxs_nuclei(tmp_path, monkeypatch):
    """Post-processing the core plus a margin gives the candidates of the whole read box; a nucleus larger than
    the margin (160 px across, on a seam) sends its tile back to the whole read box."""
    from wsi_fakes import block_labels, write_oracle_slide

    from pronet_wsi.tiling import TileGrid
    from pronet_wsi.wsi.tile_task import post_box, post_margin_px

    _, labels = block_labels((640, 640), seed=3)
    yy, xx = np.mgrid[:640, :640]
    labels[(yy - 445) ** 2 + (xx - 290) ** 2 < 80**2] = labels.max() + 1  # a giant nucleus on a seam
    path = write_oracle_slide(tmp_path / "s.tif", labels)
    tiles = list(TileGrid((640, 640), TilingConfig(448, 96), 16))
    margin = post_margin_px(8.0, 0.0, 0.25)
    assert margin == 8.0 + 64.0
    assert any(post_box(t, margin).area < t.read.area for t in tiles)  # the window is smaller than the read box
    whole, _ = _run_all(tmp_path, "whole", path, tiles, 0.0)
    import pronet_wsi.wsi.tile_task as task

    calls = []
    real = task.postprocess
    monkeypatch.setattr(task, "postprocess", lambda maps, *a: calls.append(maps["centers"].shape) or real(maps, *a))
    window, stats = _run_all(tmp_path, "window", path, tiles, margin)
    assert len(calls) == len(tiles) + 2  # its two tiles ran twice: the window cut it, then the read box
    for a, b in zip(whole, window, strict=True):
        assert len(a) > 0 and len(a) == len(b)
        assert np.array_equal(a.centers_xy, b.centers_xy) and np.array_equal(a.coords, b.coords)
        assert np.array_equal(a.area_px, b.area_px) and np.array_equal(a.in_core, b.in_core)
    assert all(s["cut_at_edge"] == 0 for s in stats)


def test_model_slots_let_a_predictors_streams_run_at_once_and_no_more():
    """A predictor with ``concurrency`` 2 (OpenVINO streams) runs two calls at once, never three; one without the
    attribute (PyTorch) runs one at a time."""
    from pronet_wsi.wsi.tile_task import _ModelSlots

    class Model:
        def __init__(self, concurrency=None):
            if concurrency is not None:
                self.concurrency = concurrency
            self.running, self.most, self.lock = 0, 0, threading.Lock()

        def call(self, slots):
            with slots.hold(self):
                with self.lock:
                    self.running += 1
                    self.most = max(self.most, self.running)
                threading.Event().wait(0.05)
                with self.lock:
                    self.running -= 1

    for model, expected in ((Model(2), 2), (Model(), 1)):
        slots = _ModelSlots()
        threads = [threading.Thread(target=model.call, args=(slots,)) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert model.most == expected


def test_release_free_memory_runs_where_glibc_is_and_is_a_no_op_elsewhere(monkeypatch):
    import platform

    from pronet_wsi.wsi import tile_task

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert tile_task._malloc_trim() is not None
    tile_task.release_free_memory()
    monkeypatch.setattr(tile_task, "_malloc_trim", lambda: None)
    tile_task.release_free_memory()  # musl, macOS, Windows: nothing to call
