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
