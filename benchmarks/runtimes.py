"""Forward speed of the shipped model per runtime on one input: Mpx/s and max |difference| vs PyTorch fp32.

    python -m benchmarks.runtimes                       # 1024x1024, 2 threads, batch 1
    python -m benchmarks.runtimes --side 1840 --batch 2 --threads 2

Runtimes: PyTorch eager (NCHW fp32, channels_last fp32, channels_last bf16 autocast), ``torch.compile``
(``--compile``, slow to start), ONNX Runtime CPU (fp32) and OpenVINO (fp32, bf16 hint) when installed. Each row is
the median of ``--repeats`` timed calls after one warm-up; the input is a synthetic H&E-like image, uint8 in, the
maps (sigmoid / offsets) out, normalisation included. "max |d|" is over all maps vs PyTorch fp32 NCHW.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import record

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, x, repeats: int) -> tuple[float, dict[str, np.ndarray]]:
    out = fn(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also torch.compile (minutes to compile)")
    parser.add_argument("--runtimes", nargs="+", default=["torch", "onnx", "openvino"],
                        choices=["torch", "onnx", "openvino"], help="which to time (torch fp32 NCHW is the reference)")
    parser.add_argument("--smoke", action="store_true", help="one 256 px input, PyTorch only, 1 repeat (does it run?)")
    args = parser.parse_args()
    if args.smoke:
        args.side, args.repeats, args.runtimes = 256, 1, ["torch"]
    torch.set_num_threads(args.threads)
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_demo_slide", ROOT / "examples" / "make_demo_slide.py")
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)  # the demo slide's synthetic tissue, from the example script itself
    demo_image = demo.demo_image

    from pronet_wsi.model import default_model_dir, load_model
    from pronet_wsi.runtime import MapsNet, OpenVINOForward, activate_maps, openvino_available

    bundle = load_model(default_model_dir())
    names = ("foreground", "offsets", "centers")
    scale = bundle.config.offset_scale
    img = demo_image(args.side, seed=1, glass=False)
    x = np.repeat(img[None], args.batch, axis=0)
    net = MapsNet(bundle.model.eval(), bundle.config.mean, bundle.config.std).eval()

    def torch_fn(module, bf16=False):
        @torch.inference_mode()
        def run(t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = module(torch.from_numpy(t))
            return activate_maps(out[0].float().numpy(), scale)
        return run

    rows: list[tuple[str, float, float, float]] = []  # name, seconds, Mpx/s, max |d|
    mpx = args.batch * args.side**2 / 1e6
    ref: dict[str, np.ndarray] = {}

    def add(name, fn, setup_s=0.0):
        s, out = timed(fn, x, args.repeats)
        if not ref:
            ref.update(out)
        d = max(float(np.abs(out[n] - ref[n]).max()) for n in names)
        rows.append((name, s, mpx / s, d, setup_s))
        print(f"{name}: {s:.2f} s, {mpx / s:.2f} Mpx/s, max |d| {d:.2e}, setup {setup_s:.1f} s", file=sys.stderr)

    add("torch NCHW fp32", torch_fn(net))
    cl = MapsNet(bundle.model.eval().to(memory_format=torch.channels_last), bundle.config.mean,
                 bundle.config.std).eval()
    if "torch" in args.runtimes:
        add("torch channels_last fp32", torch_fn(cl))
        add("torch channels_last bf16", torch_fn(cl, bf16=True))
    if args.compile:
        t = time.perf_counter()
        comp = torch.compile(cl)
        torch_fn(comp)(x)
        add("torch.compile fp32", torch_fn(comp), time.perf_counter() - t)
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    if ort is not None and "onnx" in args.runtimes:
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "pronet.onnx"
            torch.onnx.export(net, (torch.from_numpy(x),), str(path), input_names=["tiles"], output_names=["maps"],
                              dynamic_axes={"tiles": {0: "b", 1: "h", 2: "w"}}, opset_version=17, dynamo=False)
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            so.inter_op_num_threads = 1
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        add(f"onnxruntime {ort.__version__} fp32",
            lambda t: activate_maps(sess.run(None, {"tiles": t})[0], scale), time.perf_counter() - t)
    if openvino_available() and "openvino" in args.runtimes:
        import openvino as ov

        for bf16 in (False, True):
            t = time.perf_counter()
            fwd = OpenVINOForward(bundle.model.eval(), bundle.config.mean, bundle.config.std, bf16,
                                  threads=args.threads)
            add(f"openvino {ov.__version__.split('-')[0]} {fwd.precision}", fwd, time.perf_counter() - t)
    print(record.banner())
    print(f"one {args.batch}x{args.side}x{args.side} input, {args.threads} threads, median of {args.repeats}; "
          f"torch {torch.__version__}")
    print("| runtime | s | Mpx/s | max abs diff vs torch fp32 | setup s |")
    print("|---|---|---|---|---|")
    for name, s, rate, d, setup in rows:
        print(f"| {name} | {s:.2f} | {rate:.2f} | {d:.1e} | {setup:.1f} |")


if __name__ == "__main__":
    main()
