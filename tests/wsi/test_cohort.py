"""Cohorts: manifests, globs, shards, per-slide isolation with failure records, and `pronet-wsi summary`."""

import csv
import json

import pytest
from click.testing import CliRunner
from wsi_fakes import small_slide, tiny_model_dir

from pronet_wsi.cli import main
from pronet_wsi.errors import InputError
from pronet_wsi.wsi.cohort import (
    SUMMARY_COLUMNS,
    expand_inputs,
    parse_shard,
    read_manifest,
    select_shard,
    summary_rows,
    summary_totals,
)

COMMON = ["--tile-px", 256, "--halo-px", 32, "--quiet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Ten small slides in slides/ (one truncated: s03.tif) and a manifest listing them with relative paths."""
    root = tmp_path_factory.mktemp("cohort")
    (root / "slides").mkdir()
    paths = [small_slide(root / "slides" / f"s{k:02d}.tif", seed=k) for k in range(10)]
    paths[3].write_bytes(paths[3].read_bytes()[:3000])
    manifest = root / "slides.csv"
    manifest.write_text("path,mpp\n" + "".join(f"slides/{p.name},\n" for p in paths))
    return root, paths, manifest


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# -- manifests, globs, shards -------------------------------------------------------------------------------------
def test_manifest_with_header_relative_paths_mpp_and_output_names(tmp_path):
    (tmp_path / "sub").mkdir()
    m = tmp_path / "sub" / "cohort.csv"
    m.write_text("patient,Path,mpp,output\n# a comment\n\np1,a.svs,0.25,first\np2,/abs/b.tif,,\n"
                 "p3,\"dir, with comma/c.ndpi\",0.5,\n")
    items = read_manifest(m)
    assert items[0].path == tmp_path / "sub" / "a.svs" and str(items[1].path) == "/abs/b.tif"
    assert items[2].path == tmp_path / "sub" / "dir, with comma" / "c.ndpi"
    assert [i.mpp for i in items] == [0.25, None, 0.5]
    assert [i.stem for i in items] == ["first", "b", "c"]
    assert items[2].source == f"{m} line 6"


def test_manifest_without_header(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("x/one.svs\ntwo.svs,0.5\nthree.svs,,third\n")
    items = read_manifest(m)
    assert [(i.path.name, i.mpp, i.stem) for i in items] == [("one.svs", None, "one"), ("two.svs", 0.5, "two"),
                                                              ("three.svs", None, "third")]


@pytest.mark.parametrize("text,line,words", [
    ("path,mpp\na.svs,fast\n", 2, "mpp 'fast'"),
    ("path,mpp\na.svs,0\n", 2, "mpp '0'"),
    ("path,mpp\na.svs,0.5\n,0.5\n", 3, "empty path"),
    ("path,output\na.svs,x\nb.svs,x\n", 3, "also that of line 2"),
    ("a.svs\nsub/a.tif\n", 2, "also that of line 1"),
    ("path,output\na.svs,../up\n", 2, "plain file name"),
    ("path,mpp\na.svs,0.5,extra\n", 2, "3 fields but the header has 2"),
    ("a.svs,0.5,out,extra\n", 1, "4 fields"),
    ("path,path\na.svs,b.svs\n", 1, "two path columns"),
])
def test_manifest_errors_name_the_line(tmp_path, text, line, words):
    m = tmp_path / "bad.csv"
    m.write_text(text)
    with pytest.raises(InputError) as err:
        read_manifest(m)
    msg = str(err.value)
    assert f"bad.csv line {line}:" in msg and words in msg and "\n" not in msg


def test_manifest_file_errors(tmp_path):
    with pytest.raises(InputError, match="manifest not found"):
        read_manifest(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("path,mpp\n\n# nothing\n")
    with pytest.raises(InputError, match="lists no slides"):
        read_manifest(tmp_path / "empty.csv")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(InputError, match="cannot be read"):
        read_manifest(tmp_path / "bin.csv")


def test_globs_expand_sorted_and_a_pattern_without_match_is_an_error(tmp_path):
    for name in ("b.svs", "a.svs", "c.tif"):
        (tmp_path / name).write_text("x")
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "d.svs").write_text("x")
    items = expand_inputs([str(tmp_path / "*.svs"), str(tmp_path / "c.tif")])
    assert [i.path.name for i in items] == ["a.svs", "b.svs", "c.tif"]
    assert [i.path.name for i in expand_inputs([str(tmp_path / "**" / "*.svs")])] == ["a.svs", "b.svs", "d.svs"]
    with pytest.raises(InputError, match="no file matches"):
        expand_inputs([str(tmp_path / "*.ndpi")])


@pytest.mark.parametrize("n_items", [0, 1, 7, 10])
@pytest.mark.parametrize("n_shards", [1, 2, 3, 11])
def test_shards_cover_the_list_exactly_once(n_items, n_shards):
    items = list(range(n_items))
    parts = [select_shard(items, i, n_shards) for i in range(n_shards)]
    assert sorted(x for p in parts for x in p) == items
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


@pytest.mark.parametrize("text", ["2/2", "1", "a/b", "-1/3", "0/0", "1/2/3"])
def test_bad_shards(text):
    with pytest.raises(InputError, match="--shard"):
        parse_shard(text)
    assert parse_shard(" 3 / 4 ") == (3, 4)


# -- end to end ---------------------------------------------------------------------------------------------------
def test_two_shards_cover_a_manifest_exactly_once(cohort, model_dir, tmp_path):
    root, paths, _ = cohort
    m = tmp_path / "five.csv"
    m.write_text("path\n" + "".join(f"{p}\n" for k, p in enumerate(paths) if k != 3 and k < 6))
    out = tmp_path / "out"
    done = []
    for shard in ("0/2", "1/2"):
        res = run("segment", "--manifest", m, "--shard", shard, "-o", out, "-m", model_dir, *COMMON)
        assert res.exit_code == 0, res.output
        assert f"shard {shard}: {3 if shard == '0/2' else 2} of 5 slides" in res.output
        done.append({line.split(":")[0] for line in res.output.splitlines() if "nuclei in" in line})
    assert done[0] == {"s00.tif", "s02.tif", "s05.tif"} and done[1] == {"s01.tif", "s04.tif"}
    assert sorted(p.name for p in out.glob("*.geojson")) == ["s00.geojson", "s01.geojson", "s02.geojson",
                                                             "s04.geojson", "s05.geojson"]
    res = run("segment", "--manifest", m, "--shard", "2/2", "-o", out, "-m", model_dir)
    assert res.exit_code != 0 and "0 <= I < N" in res.output


def test_a_corrupt_slide_in_ten_then_summary(cohort, model_dir, tmp_path):
    root, paths, manifest = cohort
    out = tmp_path / "out"
    res = run("segment", "--manifest", manifest, "-o", out, "-m", model_dir, *COMMON)
    assert res.exit_code == 1
    errors = [line for line in res.output.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "s03.tif" in errors[0] and "truncated" in errors[0]
    assert "1 of 10 slides failed" in res.output
    assert sorted(p.stem for p in out.glob("*.geojson")) == [f"s{k:02d}" for k in range(10) if k != 3]
    assert json.loads((out / "s03.json").read_text())["status"] == "failed"
    assert not list(out.glob("s03*.geojson")) and not list(out.glob(".s03.geojson*"))

    res = run("summary", out)
    assert res.exit_code == 0, res.output
    rows = read_csv(out / "summary.csv")
    assert list(rows[0]) == list(SUMMARY_COLUMNS) and len(rows) == 10
    failed = [r for r in rows if r["status"] != "done"]
    assert len(failed) == 1 and failed[0]["status"] == "failed" and failed[0]["slide"].endswith("s03.tif")
    assert "s03.tif" in failed[0]["error"] and "truncated" in failed[0]["error"]
    assert "FAILED" in res.output and "s03.tif" in res.output
    done = [r for r in rows if r["status"] == "done"]
    records = {p.stem: json.loads(p.read_text()) for p in out.glob("s*.json")}
    for r in done:
        rec = records[r["name"]]
        assert int(r["nuclei"]) == rec["counts"]["nuclei"] > 0
        # 384 x 384 px at 0.5 um/px, all tissue
        assert float(r["tissue_area_mm2"]) == pytest.approx(0.192**2, rel=0.02)
        assert float(r["nuclei_per_mm2"]) == pytest.approx(int(r["nuclei"]) / float(r["tissue_area_mm2"]), rel=1e-3)
        areas = [f["properties"]["measurements"]["Area µm^2"]
                 for f in json.loads((out / f"{r['name']}.geojson").read_text())["features"]]
        assert float(r["mean_area_um2"]) == pytest.approx(sum(areas) / len(areas), rel=1e-3)
        assert float(r["wall_time_s"]) > 0 and float(r["mpx_per_s"]) > 0
    total = sum(int(r["nuclei"]) for r in done)
    assert "10 slides: 9 done, 1 failed" in res.output and f"{total:,} nuclei" in res.output
    totals = summary_totals(summary_rows(out))
    assert totals["nuclei"] == total and totals["tissue_area_mm2"] == pytest.approx(9 * 0.192**2, rel=0.02)

    # a rerun skips the nine finished slides and fails the corrupt one again
    res = run("segment", "--manifest", manifest, "-o", out, "-m", model_dir, *COMMON)
    assert res.exit_code == 1 and res.output.count("skipped") == 9
    # summary against a longer manifest: a slide never run is "missing"
    longer = tmp_path / "longer.csv"
    longer.write_text(manifest.read_text().replace("path,mpp\n", f"path,mpp\n{root}/slides/new.tif,\n"))
    res = run("summary", out, "--manifest", longer, "-o", tmp_path / "s.csv")
    rows = read_csv(tmp_path / "s.csv")
    assert [r["status"] for r in rows][:2] == ["missing", "done"] and rows[0]["name"] == "new"
    assert "MISSING" in res.output and "1 missing" in res.output


def test_glob_argument_and_usage_errors(cohort, model_dir, tmp_path):
    root, _, manifest = cohort
    res = run("segment", str(root / "slides" / "s0[12].tif"), "-o", tmp_path / "o", "-m", model_dir, *COMMON)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "o").glob("*.geojson")) == ["s01.geojson", "s02.geojson"]
    res = run("segment", root / "slides" / "s01.tif", "--manifest", manifest, "-o", tmp_path / "o")
    assert res.exit_code == 2 and "not both" in res.output
    res = run("segment", "-o", tmp_path / "o")
    assert res.exit_code == 2 and "--manifest" in res.output
    bad = tmp_path / "bad.csv"
    bad.write_text("path,mpp\nx.svs,huge\n")
    res = run("segment", "--manifest", bad, "-o", tmp_path / "o", "-m", model_dir)
    assert res.exit_code == 1 and "bad.csv line 2" in res.output and len(res.output.strip().splitlines()) == 1
    res = run("summary", tmp_path / "nothing-here")
    assert res.exit_code == 1 and "not a folder" in res.output


def test_manifest_output_name_and_mpp_columns(model_dir, tmp_path):
    from PIL import Image

    from pronet_wsi.slide import open_slide

    with open_slide(small_slide(tmp_path / "tiff.tif")) as s:
        rgb = s.read_level(0, 0, 0, s.shape)
    Image.fromarray(rgb).save(tmp_path / "plain.png")  # no pixel size in the file
    m = tmp_path / "m.csv"
    m.write_text("path,mpp,output\nplain.png,0.5,renamed\nplain.png,,\n")
    out = tmp_path / "out"
    res = run("segment", "--manifest", m, "-o", out, "-m", model_dir, *COMMON)
    assert res.exit_code == 1
    assert "ERROR" in res.output and "--mpp" in res.output and "1 of 2 slides failed" in res.output
    record = json.loads((out / "renamed.json").read_text())
    assert record["status"] == "done" and record["name"] == "renamed" and record["slide"]["mpp"] == 0.5
    assert record["slide"]["mpp_source"] == "--mpp"
    assert json.loads((out / "plain.json").read_text())["status"] == "failed"
    fc = json.loads((out / "renamed.geojson").read_text())
    assert fc["features"]
    assert len({f["id"] for f in fc["features"]}) == len(fc["features"])
