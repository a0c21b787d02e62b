import numpy as np
import pytest
import tifffile
from PIL import Image
from wsi_fakes import cli_run, one_line_error

from pronet_wsi.errors import InputError
from pronet_wsi.geometry import Box
from pronet_wsi.slide import Slide, _to_rgb, open_slide, write_pyramid_tiff


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (600, 900, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("slide") / "p.tif"
    write_pyramid_tiff(path, img, mpp=0.5, tile_px=128, levels=3, compression="zlib")
    return path, img


@pytest.mark.parametrize("backend", ["openslide", "tiffslide", "auto"])
def test_pyramid_tiff_reads_in_both_backends(pyramid, backend):
    path, img = pyramid
    with open_slide(path, backend) as s:
        assert s.backend == ("tiffslide" if backend == "auto" else backend)  # auto: a generic TIFF, tiffslide
        assert s.mpp == pytest.approx(0.5) and s.mpp_source == "slide"
        assert s.level_count == 3 and s.level_downsamples == (1.0, 2.0, 4.0)
        assert s.shape == (600, 900) and s.level_shapes[1] == (300, 450)
        assert (s.read_box(Box(100, 50, 356, 306), (256, 256)) == img[50:306, 100:356]).all()
        # outside the slide is white, inside is the image
        edge = s.read_box(Box(-20, 580, 30, 630), (50, 50))
        assert (edge[:, :20] == 255).all() and (edge[20:] == 255).all()
        assert (edge[:20, 20:] == img[580:600, 0:30]).all()
        # a 2x downsampled read comes from level 1 without resampling
        half = s.read_box(Box(200, 100, 456, 356), (128, 128))
        assert (half == s.read_level(100, 50, 1, (128, 128))).all()


def test_upsampling_a_coarse_slide_matches_bilinear_resize(pyramid):
    path, img = pyramid
    with open_slide(path) as s:
        up = s.read_box(Box(100, 100, 164, 164), (128, 128)).astype(int)
    ref = np.asarray(Image.fromarray(img).resize((1800, 1200), Image.Resampling.BILINEAR))[200:328, 200:328]
    assert np.abs(up - ref).mean() < 1.0  # same sampling grid; only the crop border differs


def test_thumbnail_shape_and_downsample(pyramid):
    path, _ = pyramid
    with open_slide(path) as s:
        thumb, ds = s.thumbnail(300)
    assert ds == pytest.approx(3.0) and thumb.shape == (200, 300, 3)


def test_bounds_are_subtracted(tmp_path):
    img = np.arange(60 * 80 * 3, dtype=np.uint32).reshape(60, 80, 3).astype(np.uint8)
    s = Slide(tmp_path / "x", "image", img, 0.25, "slide", Box(10, 20, 70, 60), ((60, 80),), (1.0,))
    assert s.shape == (40, 60)
    assert (s.read_box(Box(0, 0, 5, 5), (5, 5)) == img[20:25, 10:15]).all()


def test_transparent_pixels_become_white():
    rgba = np.array([[[10, 20, 30, 255], [0, 0, 0, 0], [100, 100, 100, 128]]], np.uint8)
    out = _to_rgb(rgba)
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [255, 255, 255]
    assert out[0, 2].tolist() == [177, 177, 177]


def test_plain_images_are_one_level_slides_needing_mpp(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    with pytest.raises(InputError, match="--mpp"):
        open_slide(tmp_path / "a.png")
    with open_slide(tmp_path / "a.png", mpp=0.3) as s:
        assert s.backend == "image" and s.mpp == 0.3 and s.mpp_source == "--mpp"
        assert (s.read_box(Box(0, 0, 70, 50), (50, 70)) == img).all()
    # a plain TIFF with resolution tags carries its mpp
    tifffile.imwrite(tmp_path / "b.tif", img, resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    with open_slide(tmp_path / "b.tif") as s:
        assert s.mpp == pytest.approx(0.25)


def test_bad_inputs_are_one_line_input_errors(tmp_path, pyramid):
    path, _ = pyramid
    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide\n")
    data = path.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) * 2 // 3])
    for bad, pattern in [(tmp_path / "missing.svs", "not found"), (text, "cannot be read as a slide"),
                         (cut, "truncated"), (tmp_path, "not a file")]:
        with pytest.raises(InputError, match=pattern) as exc:
            open_slide(bad)
        assert str(bad) in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(InputError, match="--backend"):
        open_slide(path, backend="bioformats")
    with pytest.raises(InputError, match="--mpp"):
        open_slide(path, mpp=-1)


@pytest.mark.data
def test_real_slides(slides_dir):
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as s:
        assert s.mpp == pytest.approx(0.499) and s.shape == (2967, 2220) and s.backend == "tiffslide"
        tile = s.read_box(Box(1000, 1000, 1256, 1256), (256, 256))
        assert tile.dtype == np.uint8 and tile.shape == (256, 256, 3) and tile.std() > 5
    for name in ("CMU-1-Small-Region.svs", "TCGA-CR-7395-01A-01-TS1.svs"):  # Aperio JPEG, JPEG 2000
        with open_slide(slides_dir / name, "openslide", mpp=0.25) as a, \
                open_slide(slides_dir / name, "tiffslide", mpp=0.25) as b:
            assert a.level_shapes == b.level_shapes and a.level_downsamples == pytest.approx(b.level_downsamples)
            for box in (Box(0, 0, 700, 500), Box(1500, 1100, 2012, 1612), Box(0, 0, 2000, 2000)):
                assert np.array_equal(a.read_box(box, (500, 700) if box.x1 == 700 else (512, 512)),
                                      b.read_box(box, (500, 700) if box.x1 == 700 else (512, 512)))
    tcga = slides_dir / "TCGA-CR-7395-01A-01-TS1.svs"
    with pytest.raises(InputError, match="--mpp") as exc:
        open_slide(tcga)
    assert str(tcga) in str(exc.value)
    with open_slide(tcga, mpp=0.25) as s:
        assert s.level_count == 2 and s.level_downsamples[1] == pytest.approx(2.0005, abs=1e-4)
        assert s.read_box(Box(0, 0, 4443, 3567), (64, 64)).shape == (64, 64, 3)


def test_auto_leaves_other_vendors_and_formats_to_openslide(pyramid, tmp_path, monkeypatch):
    import tiffslide

    path, _ = pyramid
    other = tmp_path / "p.weird"  # not a TIFF name: OpenSlide first, whatever tiffslide would say
    other.write_bytes(path.read_bytes())
    with open_slide(other) as s:
        assert s.backend == "openslide"
    # a TIFF that tiffslide names another vendor's (Philips, Leica, ...): OpenSlide's
    monkeypatch.setattr(tiffslide.TiffSlide, "properties", property(lambda self: {"tiffslide.vendor": "philips"}))
    with open_slide(path) as s:
        assert s.backend == "openslide"


def test_bounds_from_properties_for_both_backends():
    from pronet_wsi.slide import _bounds

    for prefix in ("openslide", "tiffslide"):
        props = {f"{prefix}.bounds-x": "100", f"{prefix}.bounds-y": "50", f"{prefix}.bounds-width": "300",
                 f"{prefix}.bounds-height": "200"}
        b = _bounds(props, prefix, (1000, 800))
        assert (b.x0, b.y0, b.x1, b.y1) == (100, 50, 400, 250)
        b = _bounds({}, prefix, (1000, 800))
        assert (b.x0, b.y0, b.x1, b.y1) == (0, 0, 1000, 800)


@pytest.mark.parametrize("mpp", [0.05, 2.0, 84.7])
def test_one_mpp_bound_for_options_manifests_and_files(mpp, tmp_path):
    """--mpp, a manifest's mpp column and open_slide(mpp=) refuse the same values (plausible_mpp)."""
    from pronet_wsi.cli import check_mpp_option
    from pronet_wsi.slide import plausible_mpp
    from pronet_wsi.wsi.cohort import read_manifest

    assert not plausible_mpp(mpp)
    with pytest.raises(InputError, match="--mpp"):
        check_mpp_option(mpp)
    (tmp_path / "m.csv").write_text(f"path,mpp\na.tif,{mpp}\n")
    with pytest.raises(InputError, match="not a pixel size"):
        read_manifest(tmp_path / "m.csv")
    (tmp_path / "a.tif").write_bytes(b"")
    with pytest.raises(InputError, match="--mpp"):
        open_slide(tmp_path / "a.tif", mpp=mpp)


def test_dpi_tiff_asks_for_mpp(tmp_path, model_05):
    img = np.full((256, 256, 3), 200, np.uint8)
    p = tmp_path / "scan.tif"
    tifffile.imwrite(p, img, resolution=(300, 300), resolutionunit="INCH", photometric="rgb")
    res = cli_run("segment", p, "-o", tmp_path / "out", "-m", model_05, "--quiet")
    assert res.exit_code == 1 and "--mpp" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out" / "scan.geojson").exists()
    line = one_line_error(cli_run("segment", p, "-o", tmp_path / "out", "-m", model_05, "--mpp", 50))
    assert "--mpp" in line
    res = cli_run("segment", p, "-o", tmp_path / "out", "-m", model_05, "--mpp", 0.06, "--quiet")
    assert res.exit_code == 1 and "too far from the model" in res.output
