"""Which engine runs the network's forward on a CPU: PyTorch, or OpenVINO when the ``fast`` extra is installed.

OpenVINO runs the same weights 2-3x faster than PyTorch eager on a CPU (benchmarks/RESULTS.md, "runtimes"). The
graph is converted from the loaded PyTorch model when a :class:`~pronet_wsi.inference.Predictor` starts, not
shipped: a fine-tuned model folder needs no export step and the weights stay the one checksummed artefact. The
conversion (~1.3 s) is kept in a cache keyed by the weights' content (:func:`cached_openvino_graph`), so later
runs of the same model start in ~0.1 s; every run compiles the graph read back from its serialized form, so a
cached and a fresh start give the same maps bit for bit. CUDA always stays PyTorch.

``runtime="auto"`` picks OpenVINO on a CPU when it is importable, else PyTorch; the environment variable
``PRONET_WSI_RUNTIME`` (``torch`` or ``openvino``) overrides ``auto`` without touching any command line.

A model folder may also ship an **INT8 graph** (``int8.ovblob`` + ``int8.json``, :func:`write_int8_graph`; the
shipped model does, made by ``benchmarks/int8.py --write``): calibrating it needs training images, so it is made
once and shipped, not converted on the user's machine. The OpenVINO forward runs it in place of the float graph
(``InferenceConfig.int8``, env ``PRONET_WSI_INT8=off``) while it belongs to the folder's weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pronet_wsi.errors import InputError
from pronet_wsi.files import atomic_bytes, atomic_text, sha256_file

if TYPE_CHECKING:
    from pronet_wsi.model import PRONet

RUNTIMES = ("auto", "torch", "openvino")
ENV_VAR = "PRONET_WSI_RUNTIME"
CACHE_ENV_VAR = "PRONET_WSI_CACHE_DIR"  # where converted graphs are kept; "off" = convert on every start
_IR_MAGIC = b"PRONET-OV-IR-1\n"
INT8_ENV_VAR = "PRONET_WSI_INT8"  # "off": the float graph even where the model folder has an INT8 one
INT8_FILE = "int8.ovblob"  # a model folder's INT8 graph (the serialized format of the graph cache)
INT8_META = "int8.json"  # what it was made from: the weights' and the graph's sha256, how
# what a graph returns (int8.json "outputs"): "raw maps" = MapsNet's (maps[, types]); a graph of another layout
# (an older version's, which returned activated maps) is not run
GRAPH_OUTPUTS = "raw maps"


def openvino_available() -> bool:
    """Whether the optional ``openvino`` package (``pip install "pronet-wsi[fast]"``) imports."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def choose_runtime(requested: str, device: torch.device) -> str:
    """``torch`` or ``openvino`` for a requested runtime (``auto``, ``torch``, ``openvino``) on ``device``.

    ``auto`` reads ``PRONET_WSI_RUNTIME`` first, then takes OpenVINO on a CPU when installed. Asking for OpenVINO
    on CUDA or without the package is an error naming the fix.
    """
    if requested == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env and env not in RUNTIMES:
            raise InputError(f"{ENV_VAR}={env!r}: unknown runtime; use torch, openvino or auto (or unset it)")
        requested = env or "auto"
    if requested not in RUNTIMES:
        raise InputError(f"--runtime {requested!r}: unknown runtime; use auto, torch or openvino")
    if requested == "auto":
        return "openvino" if device.type == "cpu" and openvino_available() else "torch"
    if requested == "openvino":
        if device.type != "cpu":
            raise InputError(f"--runtime openvino runs on the CPU only; use --device cpu or --runtime torch "
                             f"(device {device})")
        if not openvino_available():
            raise InputError('--runtime openvino: OpenVINO is not installed; pip install "pronet-wsi[fast]" '
                             "or use --runtime torch")
    return requested


def available_cpus() -> int:
    """CPUs this process may run on (its affinity, as a batch scheduler sets it), else all of them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def auto_streams(threads: int = 0) -> int:
    """OpenVINO streams for many callers at once (``InferenceConfig.streams = 0``): 2 where the forward has 2 or
    more cores (``threads``, 0 = all), else 1. On 2 cores, with post-processing beside the forward, a slide took
    10-15 % less time at the same peak memory (two streams on 1792 px tiles vs one on 2048; RESULTS.md)."""
    return 2 if (threads or available_cpus()) >= 2 else 1


class MapsNet(nn.Module):
    """The network plus its input normalisation, as one exportable graph.

    tiles : (B, H, W, 3) uint8 RGB, H and W multiples of the network's stride (:func:`pad_to_stride`; the graph
    returns the maps at the size it is given, no crop) -> ``(maps,)``, the network's
    :meth:`~pronet_wsi.model.PRONet.raw_maps` (B, 4, H, W) float32 (foreground logit, offsets / offset_scale,
    centre logit), and for a typed model ``(maps, types)`` with ``types`` (B, K, H, W) class probabilities.
    :func:`activate_maps` turns ``maps`` into ``Predictor``'s maps: the sigmoids and the offsets' scale run in
    numpy, because OpenVINO's on single channels of its blocked full-resolution tensors took ~20 % of the INT8
    forward (benchmarks/RESULTS.md).
    """

    def __init__(self, model: PRONet, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.mean = nn.Parameter(torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), requires_grad=False)
        self.std = nn.Parameter(torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), requires_grad=False)

    def forward(self, tiles: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = tiles.permute(0, 3, 1, 2).float() / 255.0
        maps, types = self.model.raw_maps((x - self.mean) / self.std, crop=False)  # tiles come padded
        return (maps,) if types is None else (maps, torch.softmax(types, dim=1))


def activate_maps(maps: np.ndarray, offset_scale: float) -> dict[str, np.ndarray]:
    """:class:`MapsNet`'s (B, 4, H, W) raw maps -> ``foreground`` (B, H, W) and ``centers`` (B, H, W)
    probabilities and ``offsets`` (B, 2, H, W) px, new float32 arrays (the sigmoids and scale of
    ``Predictor._maps``)."""
    from scipy.special import expit

    maps = np.asarray(maps, np.float32)
    return {"foreground": expit(maps[:, 0]), "offsets": maps[:, 1:3] * np.float32(offset_scale),
            "centers": expit(maps[:, 3])}


def pad_to_stride(tiles: np.ndarray, stride: int = 16) -> np.ndarray:
    """(B, H, W, 3) padded at the bottom/right to multiples of ``stride`` (the network's, ``PRONet.stride``)
    exactly as ``PRONet.forward`` pads its input (reflect, or edge when the image is too small to reflect):
    normalisation is per pixel, so padding before it gives the same tensor."""
    h, w = tiles.shape[1:3]
    ph, pw = (-h) % stride, (-w) % stride
    if not (ph or pw):
        return tiles
    pads = ((0, 0), (0, ph), (0, pw), (0, 0))
    return np.pad(tiles, pads, mode="reflect") if h > ph and w > pw else np.pad(tiles, pads, mode="edge")


def openvino_graph(model: PRONet, mean: tuple[float, ...], std: tuple[float, ...]):
    """The OpenVINO model of :class:`MapsNet` (``model`` with its normalisation), any batch and tile size."""
    import openvino as ov

    net = MapsNet(model, mean, std).eval()
    example = torch.zeros((1, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing warnings: the padding branch is constant, inputs are padded
        return ov.convert_model(net, example_input=example, input=[ov.PartialShape([-1, -1, -1, 3])])


def cache_dir() -> Path | None:
    """Where converted OpenVINO graphs are kept: ``$PRONET_WSI_CACHE_DIR``, else ``$XDG_CACHE_HOME/pronet-wsi``
    (``~/.cache/pronet-wsi``); None when the variable is ``off``."""
    env = os.environ.get(CACHE_ENV_VAR, "").strip()
    if env.lower() in ("off", "none", "0"):
        return None
    if env:
        return Path(env).expanduser()
    try:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pronet-wsi"
    except (RuntimeError, KeyError):  # no home folder (a batch job without HOME): no cache
        return None


def _graph_key(model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> str:
    """The cache key of a model's graph: its weights and buffers, normalisation and architecture, and the
    versions of the code that convert it (this package's network and runtime sources, OpenVINO, PyTorch)."""
    import openvino as ov

    from pronet_wsi import __version__

    h = hashlib.sha256()
    config = getattr(model, "config", None)
    meta = {"pronet_wsi": __version__, "openvino": ov.__version__, "torch": torch.__version__,
            "mean": list(mean), "std": list(std), "config": repr(config), "class": type(model).__name__}
    h.update(json.dumps(meta, sort_keys=True).encode())
    here = Path(__file__).resolve().parent
    for source in ("model.py", "runtime.py"):
        h.update((here / source).read_bytes())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _serialize(graph) -> bytes:
    """An OpenVINO model as one blob: magic, sha256 of the rest, xml length, xml, weights."""
    import tempfile

    import openvino as ov

    with tempfile.TemporaryDirectory(prefix="pronet-ov-") as tmp:
        xml = Path(tmp) / "graph.xml"
        ov.save_model(graph, xml, compress_to_fp16=False)
        body = struct.pack("<Q", xml.stat().st_size) + xml.read_bytes() + xml.with_suffix(".bin").read_bytes()
    return _IR_MAGIC + hashlib.sha256(body).digest() + body


def _deserialize(blob: bytes):
    """The OpenVINO model of :func:`_serialize`'s blob; ValueError for anything else (a damaged cache file)."""
    import openvino as ov

    head = len(_IR_MAGIC)
    if not blob.startswith(_IR_MAGIC) or len(blob) < head + 40:
        raise ValueError("not a pronet-wsi graph")
    digest, body = blob[head : head + 32], blob[head + 32 :]
    if hashlib.sha256(body).digest() != digest:
        raise ValueError("checksum mismatch")
    (n_xml,) = struct.unpack("<Q", body[:8])
    xml, weights = body[8 : 8 + n_xml], body[8 + n_xml :]
    return ov.Core().read_model(model=xml.decode(), weights=ov.Tensor(np.frombuffer(weights, np.uint8).copy()))


def cached_openvino_graph(model: PRONet, mean: tuple[float, ...], std: tuple[float, ...]):
    """:func:`openvino_graph` of ``model``, read from the cache when an earlier run converted the same weights.

    A miss converts and writes the cache atomically (concurrent runs write the same bytes; the last rename wins);
    a damaged entry is converted again; an unwritable cache folder only costs the conversion. The graph returned
    is always the one read back from the serialized blob, cached or not, so both give the same maps. The folder
    keeps the :data:`CACHE_KEEP` most recently used graphs (each fine-tuned model adds one, ~6 MB).
    """
    folder = cache_dir()
    path = None if folder is None else folder / "openvino" / f"{_graph_key(model, mean, std)}.ovblob"
    if path is not None and path.is_file():
        try:
            graph = _deserialize(path.read_bytes())
            os.utime(path)  # recently used: kept by the pruning below
            return graph
        except (OSError, ValueError, RuntimeError):
            pass  # damaged, unreadable or pruned meanwhile: convert again (and replace it below)
    blob = _serialize(openvino_graph(model, mean, std))
    if path is not None:
        try:
            atomic_bytes(path, blob)
            _prune(path.parent, CACHE_KEEP)
        except OSError:
            pass  # a read-only or full cache folder: the run goes on without it
    return _deserialize(blob)


CACHE_KEEP = 32


def _prune(folder: Path, keep: int) -> None:
    """Delete all but the ``keep`` most recently used graphs of ``folder`` (a run reading one that is deleted
    meanwhile converts again)."""
    entries = []
    for p in folder.glob("*.ovblob"):
        try:
            entries.append((p.stat().st_mtime, p))
        except OSError:
            continue  # deleted by a concurrent prune
    for _, p in sorted(entries, reverse=True)[keep:]:
        p.unlink(missing_ok=True)


def int8_wanted(requested: str) -> bool:
    """Whether a model folder's INT8 graph may run: ``requested`` is ``InferenceConfig.int8`` (``auto`` or
    ``off``); ``PRONET_WSI_INT8=off`` turns ``auto`` off."""
    env = os.environ.get(INT8_ENV_VAR, "").strip().lower()
    if env and env not in ("auto", "off"):
        raise InputError(f"{INT8_ENV_VAR}={env!r}: use off or auto (or unset it)")
    return requested == "auto" and env != "off"


def read_int8_graph(model_dir: Path):
    """The INT8 OpenVINO graph a model folder ships (``int8.ovblob`` described by ``int8.json``) and its sha256,
    or ``(None, None)`` when the folder has none or the graph was made from other weights than the folder's (a
    model fine-tuned in a copy of the folder). A damaged graph is an error naming the fix."""
    model_dir = Path(model_dir)
    meta_path, blob_path = model_dir / INT8_META, model_dir / INT8_FILE
    if not meta_path.is_file():
        return None, None
    fix = f"reinstall the model, or delete {INT8_META} to run the float graph"
    try:
        meta = json.loads(meta_path.read_text())
        weights_sha, graph_sha = str(meta["weights_sha256"]), str(meta["graph_sha256"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{meta_path}: unreadable ({type(exc).__name__}); {fix}") from exc
    from pronet_wsi.model import WEIGHTS_FILE

    if sha256_file(model_dir / WEIGHTS_FILE) != weights_sha or meta.get("outputs") != GRAPH_OUTPUTS:
        return None, None  # other weights, or an older version's graph: the float graph of the weights runs
    if not blob_path.is_file() or sha256_file(blob_path) != graph_sha:
        raise InputError(f"{blob_path}: missing or its checksum does not match {INT8_META}; {fix}")
    try:
        return _deserialize(blob_path.read_bytes()), graph_sha
    except (ValueError, RuntimeError) as exc:
        raise InputError(f"{blob_path}: not a readable graph ({exc}); {fix}") from exc


def write_int8_graph(model_dir: Path, graph, made_by: str, **notes) -> str:
    """Store ``graph`` (an INT8 OpenVINO model of the folder's network) in a model folder, atomically, with the
    weights' sha256 it belongs to; returns the graph's sha256."""
    from pronet_wsi.model import WEIGHTS_FILE

    model_dir = Path(model_dir)
    blob = _serialize(graph)
    atomic_bytes(model_dir / INT8_FILE, blob)
    graph_sha = hashlib.sha256(blob).hexdigest()
    meta = {"weights_sha256": sha256_file(model_dir / WEIGHTS_FILE), "graph_sha256": graph_sha,
            "outputs": GRAPH_OUTPUTS, "made_by": made_by, **notes}
    atomic_text(model_dir / INT8_META, json.dumps(meta, indent=2) + "\n")
    return graph_sha


class OpenVINOForward:
    """A PRONet compiled by OpenVINO for the CPU: (B, H, W, 3) uint8 tiles -> the maps of ``Predictor``.

    bf16 : run in bfloat16 (OpenVINO's inference precision hint), as PyTorch's bf16 autocast does.
    threads : CPU threads of all inferences together (0 = all cores).
    streams : inferences that may run at once, each on ``threads / streams`` cores (OpenVINO's streams). On a
        2-core CPU two one-thread forwards beside the tile threads' post-processing beat one two-thread forward
        (whose threads wait for each other at every layer when post-processing takes a core): benchmarks/RESULTS.md.
    graph : an OpenVINO model to compile instead of :func:`openvino_graph` of ``model`` (e.g. a quantized one,
        ``benchmarks/int8.py``).
    """

    def __init__(self, model: PRONet, mean: tuple[float, ...], std: tuple[float, ...], bf16: bool,
                 threads: int = 0, graph=None, streams: int = 1) -> None:
        import openvino as ov

        if graph is None:
            graph = cached_openvino_graph(model, mean, std)
        config: dict[str, object] = {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"}
        if streams > 1:
            config["NUM_STREAMS"] = streams
        else:
            config["PERFORMANCE_HINT"] = "LATENCY"
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(graph, "CPU", config)
        self.typed = bool(model.config.classes)  # a type head: a second output
        self.offset_scale = float(model.config.offset_scale)
        self.stride = int(getattr(model, "stride", 16))
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)  # f32 or bf16
        self.streams = max(1, int(self.compiled.get_property("NUM_STREAMS")))
        self._requests: queue.SimpleQueue = queue.SimpleQueue()  # one request per stream, reused
        for _ in range(self.streams):
            self._requests.put(self.compiled.create_infer_request())

    def __call__(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        """Maps for (B, H, W, 3) uint8 tiles of any size (padded to the network's stride and cropped back).
        Thread-safe: a call waits for a free stream."""
        h, w = tiles.shape[1:3]
        x = np.ascontiguousarray(pad_to_stride(tiles, self.stride))
        request = self._requests.get()
        try:
            # no copies in or out (~25 ms of a 2112² tile): the request's own output buffers are read before the
            # request is handed back, into new arrays (activate_maps, the copy)
            outputs = request.infer([x], share_inputs=True, share_outputs=True).to_tuple()
            maps = activate_maps(outputs[0][..., :h, :w], self.offset_scale)
            if self.typed:
                maps["types"] = np.array(outputs[1][..., :h, :w], dtype=np.float32, copy=True)
            return maps
        finally:
            self._requests.put(request)
