import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from wsi_fakes import cli_run, one_line_error

from pronet_wsi.errors import InputError
from pronet_wsi.model import VGG16_STAGES, ModelConfig, PRONet, load_model, save_model
from pronet_wsi.postprocess import PostprocessConfig
from pronet_wsi.training.loop import load_checkpoint


@pytest.mark.parametrize("stem_stride", [1, 2])
@pytest.mark.parametrize("hw", [(250, 250), (333, 517), (64, 48)])
def test_forward_backward_odd_sizes(hw, stem_stride):
    torch.manual_seed(0)
    model = PRONet(ModelConfig(width=0.1, stem_stride=stem_stride))
    assert model.stride == 16 * stem_stride
    x = torch.randn(2, 3, *hw, requires_grad=True)
    out = model(x)
    assert out["foreground"].shape == (2, 1, *hw)
    assert out["offsets"].shape == (2, 2, *hw)
    assert out["centers"].shape == (2, 1, *hw)
    sum(v.mean() for v in out.values()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("stem_stride", [1, 2])
@pytest.mark.parametrize("classes", [(), ("Tumor", "Immune cells")])
def test_raw_maps_are_forwards_maps_in_one_tensor(stem_stride, classes):
    """``raw_maps`` (what an exported graph returns) holds ``forward``'s maps: foreground and centre logits,
    offsets divided by ``offset_scale``, and the type logits beside."""
    torch.manual_seed(0)
    model = PRONet(ModelConfig(width=0.1, stem_stride=stem_stride, classes=classes)).eval()
    with torch.no_grad():
        for module in model.modules():  # the refinement starts at zero: give it weights to carry
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.normal_(module.weight, std=0.3)
        x = torch.randn(1, 3, 77, 90)
        out, (maps, types) = model(x), model.raw_maps(x)
    assert maps.shape == (1, 4, 77, 90)
    assert torch.allclose(maps[:, :1], out["foreground"], atol=1e-6)
    assert torch.allclose(maps[:, 1:3] * model.config.offset_scale, out["offsets"], atol=1e-5)
    assert torch.allclose(maps[:, 3:], out["centers"], atol=1e-6)
    assert (types is None) == (not classes)
    if classes:
        assert torch.allclose(types, out["types"], atol=1e-6)
    with torch.no_grad():  # uncropped: the maps of the input padded to the stride (what the exported graph returns)
        padded, _ = model.raw_maps(x, crop=False)
        same, _ = model.raw_maps(x[..., :64, :64], crop=False)
    assert padded.shape[-2:] == (77 + (-77) % model.stride, 90 + (-90) % model.stride)
    assert torch.equal(padded[..., :77, :90], maps)
    assert same.shape[-2:] == (64, 64)


def test_vgg16_encoder_has_13_convs_and_width_scales_channels():
    full, narrow = PRONet(ModelConfig(width=1.0)), PRONet(ModelConfig(width=0.25))
    convs = [m for m in full.stages.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == sum(n for _, n in VGG16_STAGES) == 13
    assert [c.out_channels for c in convs][-1] == 512
    assert [m for m in narrow.stages.modules() if isinstance(m, torch.nn.Conv2d)][-1].out_channels == 128
    n_full = sum(p.numel() for p in full.parameters())
    n_narrow = sum(p.numel() for p in narrow.parameters())
    assert 10 < n_full / n_narrow < 20


def test_stride_2_stem_runs_every_layer_at_half_resolution_or_less():
    """The stem folds 2x2 blocks into channels, so no convolution before the refinement sees full resolution;
    the refinement starts at zero, so an untrained stride-2 network is its half-resolution maps upsampled."""
    torch.manual_seed(0)
    model = PRONet(ModelConfig(width=0.1, stem_stride=2, classes=("a", "b"))).eval()
    sizes: dict[str, tuple[int, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out, name=name: sizes.__setitem__(name, tuple(out.shape[-2:])))
    x = torch.randn(1, 3, 128, 96)
    out = model(x)
    assert model.stages[0][0].in_channels == 12
    assert {k: v for k, v in sizes.items() if not k.startswith("refine.")} and all(
        h <= 64 and w <= 48 for k, (h, w) in sizes.items() if not k.startswith("refine."))
    assert sizes["refine.0"] == (128, 96)
    assert all(v.shape[-2:] == (128, 96) for v in out.values()) and out["types"].shape[1] == 2
    captured: dict[str, torch.Tensor] = {}
    model.head_center.register_forward_hook(lambda mod, inp, o: captured.__setitem__("centers", o))
    out = model(x)
    up = torch.nn.functional.interpolate(captured["centers"], scale_factor=2.0, mode="bilinear", align_corners=False)
    assert captured["centers"].shape[-2:] == (64, 48) and torch.allclose(out["centers"], up, atol=1e-6)
    with pytest.raises(InputError, match="stem_stride"):
        ModelConfig(stem_stride=4)


def test_deep_type_head_sees_the_last_two_decoder_levels_and_round_trips(tmp_path):
    """``type_head="deep"`` classes from the decoder's last level and, upsampled, the coarser one before it; the
    choice is saved with the model and loads back to the same network."""
    torch.manual_seed(0)
    cfg = ModelConfig(width=0.1, stem_stride=2, classes=("a", "b", "c"), type_head="deep")
    model = PRONet(cfg).eval()
    small = PRONet(ModelConfig(width=0.1, stem_stride=2, classes=("a", "b", "c")))
    c = model.ru_binary.body[0].in_channels  # the decoder's last level
    assert small.head_type[0].in_channels == c
    seen: dict[str, torch.Tensor] = {}
    model.decoder[-2].register_forward_hook(lambda mod, inp, o: seen.__setitem__("coarser", o))
    model.decoder[-1].register_forward_hook(lambda mod, inp, o: seen.__setitem__("last", o))
    model.head_type.register_forward_hook(lambda mod, inp, o: seen.__setitem__("head_in", inp[0]))
    x = torch.randn(1, 3, 96, 64)
    out = model(x)
    assert out["types"].shape == (1, 3, 96, 64)
    up = torch.nn.functional.interpolate(seen["coarser"], size=seen["last"].shape[-2:], mode="bilinear",
                                         align_corners=False)
    assert model.head_type[0].in_channels == c + seen["coarser"].shape[1] > c
    assert seen["coarser"].shape[-1] * 2 == seen["last"].shape[-1]
    assert torch.equal(seen["head_in"][:, :c], seen["last"]) and torch.equal(seen["head_in"][:, c:], up)
    model = PRONet(cfg).eval()
    save_model(model, tmp_path / "m")
    bundle = load_model(tmp_path / "m")
    assert bundle.config.type_head == "deep"
    assert torch.equal(bundle.model(x)["types"], model(x)["types"])
    assert json.loads((tmp_path / "m" / "config.json").read_text())["type_head"] == "deep"
    with pytest.raises(InputError, match="type_head"):
        ModelConfig(type_head="huge")


def test_same_output_in_train_and_eval_structure():
    model = PRONet(ModelConfig(width=0.1))
    x = torch.randn(1, 3, 64, 64)
    model.train()
    a = model(x)
    model.eval()
    b = model(x)
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def test_save_load_round_trip(tmp_path):
    model = PRONet(ModelConfig(width=0.1, mpp=0.5, mean=(0.7, 0.5, 0.6)))
    thr = PostprocessConfig(center_threshold=0.3, min_area_px=7)
    save_model(model, tmp_path / "m", thr)
    bundle = load_model(tmp_path / "m")
    assert bundle.config == model.config
    assert bundle.thresholds == thr
    x = torch.randn(1, 3, 80, 80)
    model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(bundle.model(x)["offsets"].numpy(), model(x)["offsets"].numpy(), atol=1e-6)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["width"] == 0.1


def test_the_same_weights_saved_twice_have_the_same_sha256(tmp_path):
    """The weights' sha256 is the model's identity (resume, feature ids): it must not depend on the save."""
    model = PRONet(ModelConfig(width=0.0625))
    sha = [json.loads((save_model(model, tmp_path / d) / "config.json").read_text())["weights_sha256"] for d in "ab"]
    assert sha[0] == sha[1]


def test_load_model_errors(tmp_path):
    with pytest.raises(InputError, match="not a model folder"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="broken model folder"):
        load_model(tmp_path)


def test_config_validation():
    with pytest.raises(ValueError, match="width"):
        ModelConfig(width=5)


@pytest.mark.parametrize("field,value", [("mean", (float("nan"), 0.5, 0.5)), ("std", (0.2, 0.0, 0.2)),
                                         ("context_px", -5), ("offset_scale", float("inf"))])
def test_model_config_rejects_implausible_normalisation(tmp_path, field, value):
    """Issue 17 row 6: a NaN mean or zero std would give 0 nuclei silently; the error names the field."""
    with pytest.raises(ValueError, match=f"{field}="):
        ModelConfig(**{field: value})
    d = save_model(PRONet(ModelConfig(width=0.0625)), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = list(value) if isinstance(value, tuple) else value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=f"config.json: broken model folder \\({field}="):
        load_model(d)


def test_model_identity_is_by_content(tmp_path):
    import shutil

    from pronet_wsi.model import model_identity

    d = save_model(PRONet(ModelConfig(width=0.0625)), tmp_path / "m")
    copy = shutil.copytree(d, tmp_path / "other" / "m2", copy_function=shutil.copy)
    assert model_identity(d) == model_identity(copy)
    (copy / "thresholds.json").write_text((copy / "thresholds.json").read_text().replace("0.2", "0.3"))
    assert model_identity(d) != model_identity(copy)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / f"pronet-pwned-{os.getpid()}"


@pytest.mark.parametrize("where", ["checkpoint", "weights"])
def test_crafted_pickle_never_runs(tmp_path, where, image_png):
    MARKER.unlink(missing_ok=True)
    mdir = save_model(PRONet(ModelConfig(width=0.0625)), tmp_path / "m")
    if where == "checkpoint":
        (mdir / "train").mkdir()
        with open(mdir / "train" / "checkpoint.pt", "wb") as f:
            pickle.dump({"model": _Evil()}, f)
        with pytest.raises(InputError, match="unreadable checkpoint"):
            load_checkpoint(mdir / "train" / "checkpoint.pt")
        res = cli_run("train", "--images", image_png.parent, "--points", image_png.parent, "-o", mdir, "--resume")
    else:
        cfg = json.loads((mdir / "config.json").read_text())
        cfg.pop("weights_sha256")  # an old-style folder without a checksum still never unpickles code
        (mdir / "config.json").write_text(json.dumps(cfg))
        torch.save({"x": _Evil()}, mdir / "weights.pt")
        res = cli_run("predict", image_png, "-o", tmp_path / "out", "-m", mdir)
    one_line_error(res)
    assert not MARKER.exists()


def test_damaged_weights_fail_checksum(tmp_path, image_png):
    mdir = save_model(PRONet(ModelConfig(width=0.0625)), tmp_path / "m")
    data = bytearray((mdir / "weights.pt").read_bytes())
    mid = len(data) // 2
    data[mid : mid + 1000] = bytes(1000)
    (mdir / "weights.pt").write_bytes(bytes(data))
    line = one_line_error(cli_run("predict", image_png, "-o", tmp_path / "out", "-m", mdir))
    assert "checksum" in line and "weights.pt" in line


def _variants(tmp_path: Path) -> dict[str, Path]:
    base = save_model(PRONet(ModelConfig(width=0.0625)), tmp_path / "base")
    out = {}
    for name in ("width", "pickled", "empty"):
        d = tmp_path / name
        d.mkdir()
        cfg = json.loads((base / "config.json").read_text())
        cfg.pop("weights_sha256")
        if name == "width":
            cfg["width"] = 0.125
            (d / "weights.pt").write_bytes((base / "weights.pt").read_bytes())
        elif name == "pickled":
            torch.save(PRONet(ModelConfig(width=0.0625)), d / "weights.pt")  # a whole pickled module
        else:
            (d / "weights.pt").write_bytes(b"")
        (d / "config.json").write_text(json.dumps(cfg))
        out[name] = d
    return out


def test_bad_model_folders_are_one_line_errors(tmp_path, image_png):
    for name, d in _variants(tmp_path).items():
        with pytest.raises(InputError):
            load_model(d)
        line = one_line_error(cli_run("predict", image_png, "-o", tmp_path / "out", "-m", d))
        assert "weights.pt" in line, (name, line)
