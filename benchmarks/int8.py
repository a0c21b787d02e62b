"""INT8 (NNCF post-training quantization) of the shipped model: forward speed, validation AJI, the shipped graph.

    pip install nncf==3.4.0                      # not a dependency: making the graph only, not running it
    python -m benchmarks.int8                    # calibrate, time, score the four labs' validation images
    python -m benchmarks.int8 --no-score         # speed only
    python -m benchmarks.int8 --calib 32 --write # store the graph in the model folder (how the shipped one was made)

``--via torch`` (the default) quantizes the PyTorch network and exports it; ``--via openvino`` quantizes the
converted OpenVINO graph (the earlier sessions' path, 0.01 AJI worse on MoNuSeg).

Calibration: ``--calib`` random 512 px crops (seed 0) from the training split of each lab (benchmarks/labs.py),
at the model's 0.25 um/px, fed to ``nncf.quantize`` (default preset: symmetric INT8 weights and activations).
Speed: median of ``--repeats`` forwards of one synthetic H&E-like ``--side`` px input (the demo slide's tissue)
after a warm-up, ``--threads`` threads, for OpenVINO f32, bf16 and the INT8 graph (its non-quantized operations
in f32 and in bf16). Score: validation AJI per lab, OpenVINO bf16 vs INT8 (same tiler, post-processing and
thresholds). Validation images only: a choice made here never sees a test split.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import labs, record
from benchmarks.runtimes import ROOT, timed


def calibration_tiles(n_per_lab: int, side: int = 512, seed: int = 0) -> list[np.ndarray]:
    """``n_per_lab`` random ``side`` px crops of each lab's training images, (1, side, side, 3) uint8 each."""
    rng = np.random.default_rng(seed)
    tiles = []
    for name in labs.LABS:
        items = labs.load(name, "train")
        for _ in range(n_per_lab):
            image = items[int(rng.integers(len(items)))][1]
            h, w = image.shape[:2]
            if h < side or w < side:
                image = np.pad(image, ((0, max(side - h, 0)), (0, max(side - w, 0)), (0, 0)), mode="reflect")
                h, w = image.shape[:2]
            y, x = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
            tiles.append(np.ascontiguousarray(image[None, y : y + side, x : x + side]))
    return tiles


def demo_image(side: int) -> np.ndarray:
    spec = importlib.util.spec_from_file_location("make_demo_slide", ROOT / "examples" / "make_demo_slide.py")
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo.demo_image(side, seed=1, glass=False)


def torch_int8_graph(bundle, tiles: list[np.ndarray]):
    """NNCF's post-training INT8 of the PyTorch network (with its normalisation and output activations), exported
    to OpenVINO: calibrated on ``tiles`` ((1, H, W, 3) uint8 each). Quantizing the PyTorch network (its
    convolutions before batch norm is folded) kept every lab's validation AJI within 0.005 of PyTorch fp32 where
    quantizing the converted OpenVINO graph lost 0.009-0.012 on MoNuSeg (benchmarks/RESULTS.md)."""
    import copy
    import warnings

    import nncf
    import openvino as ov
    import torch

    from pronet_wsi.runtime import MapsNet

    cfg = bundle.config
    net = MapsNet(copy.deepcopy(bundle.model).eval(), cfg.mean, cfg.std).eval()
    quantized = nncf.quantize(net, nncf.Dataset(tiles, lambda x: torch.from_numpy(x)), subset_size=len(tiles))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing warnings, as in runtime.openvino_graph
        return ov.convert_model(quantized, example_input=torch.zeros((1, 64, 64, 3), dtype=torch.uint8),
                                input=[ov.PartialShape([-1, -1, -1, 3])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calib", type=int, default=16, help="calibration crops per lab")
    parser.add_argument("--no-score", action="store_true", help="speed only")
    parser.add_argument("--preset", choices=["performance", "mixed"], default="performance",
                        help="NNCF preset: mixed = asymmetric activations (more accurate, maybe slower)")
    parser.add_argument("--full-bias-correction", action="store_true",
                        help="NNCF's full (not fast) bias correction: slower calibration, maybe more accurate")
    parser.add_argument("--keep", action="append", default=[], metavar="REGEX",
                        help="leave the graph's operations whose names match REGEX unquantized (repeatable; e.g. "
                             "'.*head_.*' keeps the output heads in float)")
    parser.add_argument("--via", choices=["torch", "openvino"], default="torch",
                        help="quantize the PyTorch network (then export) or the converted OpenVINO graph")
    parser.add_argument("--write", action="store_true",
                        help="store the INT8 graph in the model folder (int8.ovblob + int8.json), where `segment` "
                             "and `predict` run it (InferenceConfig.int8)")
    parser.add_argument("--smoke", action="store_true", help="2 demo crops to calibrate, a 256 px input, no score")
    args = parser.parse_args()
    try:
        import nncf
        import openvino as ov
    except ImportError:
        if args.smoke:
            record.smoke_skip("nncf or openvino is not installed")
        raise SystemExit('needs openvino and nncf: pip install "pronet-wsi[fast]" nncf') from None
    import torch

    from pronet_wsi.inference import InferenceConfig, Predictor, segment_image
    from pronet_wsi.metrics import evaluate_image, mean_scores
    from pronet_wsi.model import default_model_dir, load_model
    from pronet_wsi.runtime import INT8_FILE, OpenVINOForward, openvino_graph, write_int8_graph

    torch.set_num_threads(args.threads)
    if args.smoke:
        args.side, args.repeats, args.no_score = 256, 1, True
        img = demo_image(256)
        tiles = [img[None, :128, :128].copy(), img[None, 128:, 128:].copy()]
    else:
        if not labs.available():
            raise SystemExit("needs ../shared/data (the four labs' training and validation images)")
        tiles = calibration_tiles(args.calib)
    bundle = load_model(args.model or default_model_dir())
    names = ("foreground", "offsets", "centers")
    cfg = bundle.config
    t = time.perf_counter()
    if args.via == "torch":
        quantized = torch_int8_graph(bundle, tiles)
    else:
        graph = openvino_graph(bundle.model.eval(), cfg.mean, cfg.std)
        scope = nncf.IgnoredScope(patterns=args.keep, validate=False) if args.keep else None
        preset = {"performance": nncf.QuantizationPreset.PERFORMANCE,
                  "mixed": nncf.QuantizationPreset.MIXED}[args.preset]
        quantized = nncf.quantize(graph, nncf.Dataset(tiles), subset_size=len(tiles), preset=preset,
                                  fast_bias_correction=not args.full_bias_correction,
                                  **({"ignored_scope": scope} if scope else {}))
    quant_s = time.perf_counter() - t
    if args.write:
        folder = Path(args.model) if args.model else default_model_dir()
        made_by = "python -m benchmarks.int8 " + " ".join(sys.argv[1:])
        sha = write_int8_graph(folder, quantized, made_by, nncf=nncf.__version__, openvino=ov.__version__,
                               calibration=f"{len(tiles)} random 512 px crops of the four labs' training images "
                                           f"(benchmarks/int8.py calibration_tiles, seed 0)")
        print(f"wrote {folder / INT8_FILE} (sha256 {sha[:16]})", file=sys.stderr)
    print(f"quantized on {len(tiles)} crops in {quant_s:.0f} s", file=sys.stderr)

    x = demo_image(args.side)[None]
    mpx = args.side**2 / 1e6
    forwards = {}
    rows = []
    for name, g, bf16 in (("f32", None, False), ("bf16", None, True), ("int8 (rest f32)", quantized, False),
                          ("int8 (rest bf16)", quantized, True)):
        fwd = OpenVINOForward(bundle.model.eval(), cfg.mean, cfg.std, bf16, threads=args.threads, graph=g)
        s, out = timed(fwd, x, args.repeats)
        forwards[name] = (fwd, out)
        ref = forwards["f32"][1]
        d = max(float(np.abs(out[n] - ref[n]).max()) for n in names)
        rows.append((name, s, mpx / s, d))
        print(f"{name}: {s:.2f} s, {mpx / s:.2f} Mpx/s, max |d| vs f32 {d:.2e}", file=sys.stderr)
    print(record.banner(seed=0))
    print(f"OpenVINO {ov.__version__.split('-')[0]}, NNCF {nncf.__version__}; one {args.side}x{args.side} input, "
          f"{args.threads} threads, median of {args.repeats}; calibration {len(tiles)} crops ({quant_s:.0f} s)"
          + (f"; kept unquantized: {', '.join(args.keep)}" if args.keep else "")
          + f"; preset {args.preset}{', full bias correction' if args.full_bias_correction else ''}")
    print("| graph | s | Mpx/s | x f32 | max abs diff vs f32 |")
    print("|---|---|---|---|---|")
    for name, s, rate, d in rows:
        print(f"| {name} | {s:.2f} | {rate:.2f} | {rate / rows[0][2]:.2f} | {d:.1e} |")
    if args.no_score:
        return
    print("\n| validation AJI | images | OpenVINO bf16 | INT8 (rest bf16) | difference |")
    print("|---|---|---|---|---|")
    predictor = Predictor(bundle, InferenceConfig(runtime="openvino", amp="on", threads=args.threads))
    for lab in labs.LABS:
        items = labs.load(lab, "val")
        aji = {}
        for name in ("bf16", "int8 (rest bf16)"):
            predictor._fast = forwards[name][0]  # the same Predictor, tiler and thresholds; only the graph differs
            aji[name] = mean_scores([evaluate_image(gt, segment_image(im, predictor).labels)
                                     for _, im, gt in items]).aji
        print(f"| {lab} | {len(items)} | {aji['bf16']:.4f} | {aji['int8 (rest bf16)']:.4f} | "
              f"{aji['int8 (rest bf16)'] - aji['bf16']:+.4f} |", flush=True)


if __name__ == "__main__":
    main()
