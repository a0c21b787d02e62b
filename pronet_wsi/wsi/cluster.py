"""Dask distributed: tiles of one slide and slides of a batch spread over the workers of a cluster.

* :func:`open_client` connects to a running scheduler (``tcp://HOST:PORT``, e.g. one that dask-jobqueue's
  ``SLURMCluster`` started) or starts a loopback ``LocalCluster`` of N worker processes (``local:N``).
* The model reaches the workers as a :class:`ModelSpec` (model folder + inference settings, a few hundred bytes);
  each worker process loads it once, on first use, and keeps it (:func:`worker_predictor`, keyed by model folder,
  weights file, device and settings). Objects that are not a model folder (test doubles, in-memory models) are
  scattered to every worker instead.
* One GPU per worker: a worker uses ``cuda`` (its first visible GPU) when it has one, so give each worker its own
  GPU with ``CUDA_VISIBLE_DEVICES``: dask-jobqueue with one GPU per job (``--gres=gpu:1``), dask-cuda's
  ``LocalCUDACluster`` / ``dask-cuda-worker`` (one worker per GPU), or ``local:N`` here, whose worker ``i`` takes
  GPU ``i mod (number of GPUs)``.
* :class:`DaskExecutor` runs tile batches on the workers for the one slide run of
  :func:`pronet_wsi.wsi.pipeline.run_slides`, which keeps several slides in flight: the tile batches of the next
  slides are queued while the client stitches and writes a finished one, so workers do not wait for the client.

The client (this process) opens each slide for its thumbnail and writes the GeoJSON; the workers read tiles and
write per-tile parts into the output folder: slides and output folder must be on a file system every worker sees.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pronet_wsi.errors import InputError
from pronet_wsi.inference import InferenceConfig
from pronet_wsi.postprocess import PostprocessConfig
from pronet_wsi.runtime import available_cpus
from pronet_wsi.wsi.tile_task import run_batch

log = logging.getLogger(__name__)

MAX_SLIDES_IN_FLIGHT = 32  # each holds its thumbnail and tissue mask on the client (~10 MB)


def parse_scheduler(value: str) -> tuple[str, str | int]:
    """``local:N`` -> ``("local", N)``; a scheduler address (``tcp://host:port``) -> ``("address", value)``.

    Raises InputError for anything else (``local`` without a worker count, N < 1, an empty value).
    """
    text = value.strip()
    if text.lower().startswith("local"):
        count = text[5:].lstrip(":")
        if not count.isdigit() or int(count) < 1:
            raise InputError(f"--scheduler {value!r}: write local:N with N >= 1 worker processes, e.g. local:2")
        return "local", int(count)
    if not text or ("://" not in text and ":" not in text):
        raise InputError(f"--scheduler {value!r}: give a Dask scheduler address (tcp://HOST:PORT) or local:N")
    return "address", text


def local_cluster(n_workers: int, threads_per_worker: int | None = None, **kwargs):
    """A loopback ``LocalCluster`` of ``n_workers`` processes (host 127.0.0.1, dashboard on a free port).

    ``threads_per_worker`` defaults to the CPUs this process may use divided among the workers (at least 1).
    Scripts that call this need an ``if __name__ == "__main__":`` guard (workers are started by spawning).
    """
    from distributed import LocalCluster

    cpus = available_cpus()
    threads = threads_per_worker or max(1, cpus // n_workers)
    options = {"processes": True, "host": "127.0.0.1", "dashboard_address": ":0", "silence_logs": logging.ERROR}
    return LocalCluster(n_workers=n_workers, threads_per_worker=threads, **{**options, **kwargs})


def probe_scheduler(address: str, timeout_s: float = 30.0) -> None:
    """Check within ``timeout_s`` that a Dask scheduler answers at ``address`` (``tcp://HOST:PORT`` or
    ``HOST:PORT``; other protocols are left to Dask's own timeout).

    A Dask server sends its handshake message as soon as a connection opens; anything else (an HTTP server, which
    waits for a request, or a service that sends something else) is an InputError, so a wrong address never hangs
    or makes Dask read a garbage message length.
    """
    import socket
    import struct

    text = address.strip()
    proto, _, rest = text.rpartition("://")
    if proto not in ("", "tcp"):
        return
    host, _, port_text = rest.rstrip("/").rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port_text.isdigit():
        raise InputError(f"--scheduler {address}: no port; write tcp://HOST:PORT (Dask's default port is 8786)")
    deadline = time.monotonic() + timeout_s

    def recv(sock, n: int) -> bytes:
        data = b""
        while len(data) < n:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed the connection")
            data += chunk
        return data

    what = f"--scheduler {address}"
    try:
        with socket.create_connection((host, int(port_text)), timeout=timeout_s) as sock:
            (size,) = struct.unpack("<Q", recv(sock, 8))
            if not 8 <= size <= 1 << 20:
                raise InputError(f"{what}: something answers there but it is not a Dask scheduler; check the "
                                 f"address (the scheduler prints it as 'Scheduler at: tcp://...')")
            body = recv(sock, size)
    except InputError:
        raise
    except TimeoutError as exc:
        raise InputError(f"{what}: no Dask scheduler answered within {timeout_s:g} s (a web server or another "
                         f"service there?); check the address, or raise --connect-timeout") from exc
    except OSError as exc:
        raise InputError(f"{what}: cannot connect ({exc.strerror or type(exc).__name__}); start a scheduler "
                         f"(dask scheduler, dask-jobqueue) or check the address") from exc
    if b"compression" not in body and b"pickle-protocol" not in body:
        raise InputError(f"{what}: something answers there but it is not a Dask scheduler; check the address")


@contextmanager
def open_client(scheduler: str, timeout_s: float | None = None):
    """A distributed ``Client`` for ``scheduler`` (see :func:`parse_scheduler`), closed (with its cluster) on exit.

    ``timeout_s`` for connecting defaults to Dask's ``distributed.comm.timeouts.connect`` (30 s; environment
    variable ``DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT``). A scheduler address is probed first
    (:func:`probe_scheduler`): anything but a Dask scheduler is a one-line InputError, never a hang.
    """
    from distributed import Client

    kind, value = parse_scheduler(scheduler)
    if kind == "local":
        with local_cluster(int(value)) as cluster, Client(cluster, set_as_default=False) as client:
            yield client
        return
    probe_scheduler(str(value), 30.0 if timeout_s is None else timeout_s)
    try:
        client = Client(str(value), set_as_default=False, **({} if timeout_s is None else {"timeout": timeout_s}))
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - OSError, TimeoutError, a failed handshake: all mean "not here"
        raise InputError(f"--scheduler {value}: cannot connect to a Dask scheduler there ({type(exc).__name__}); "
                         f"start one (dask scheduler, dask-jobqueue) or check the address") from exc
    with client:
        yield client


# -- the model on the workers ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A model folder as the workers see it: small to send; :meth:`predict_batch` loads it once per process.

    Has what the pipeline reads on the client (``mpp``, ``postprocess_config``, ``context_px``, ``stride``,
    ``model_dir``)
    without loading the network here, so the client needs no GPU. ``pin_gpus``: with ``device="auto"``, worker
    ``i`` of a ``local:N`` cluster (worker names 0..N-1) uses ``cuda:i mod GPUs``.
    """

    model_dir: str
    inference: InferenceConfig
    mpp: float
    postprocess_config: PostprocessConfig
    context_px: int
    pin_gpus: bool = False
    classes: tuple[str, ...] = ()
    class_colors: tuple[tuple[int, int, int], ...] = ()
    stride: int = 16

    @classmethod
    def load(cls, model_dir: str | Path | None, inference: InferenceConfig = InferenceConfig(),
             pin_gpus: bool = False) -> ModelSpec:
        """Read a model folder's settings (weights on the CPU, briefly) to check it and fill the spec."""
        from pronet_wsi.model import load_model, resolve_model_dir

        path = resolve_model_dir(model_dir)
        bundle = load_model(path)
        return cls(str(Path(path).resolve()), inference, bundle.config.mpp, bundle.thresholds,
                   bundle.config.context_px, pin_gpus, bundle.config.classes, bundle.config.class_colors,
                   bundle.config.stride)

    @classmethod
    def from_predictor(cls, predictor, pin_gpus: bool = False) -> ModelSpec | None:
        """The spec of a :class:`~pronet_wsi.inference.Predictor` loaded from a folder (None otherwise)."""
        path = getattr(getattr(predictor, "bundle", None), "path", None)
        if path is None or not hasattr(predictor, "config"):
            return None
        return cls(str(Path(path).resolve()), predictor.config, predictor.mpp, predictor.postprocess_config,
                   predictor.context_px, pin_gpus, predictor.classes, predictor.class_colors, predictor.stride)

    def predict_batch(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        return worker_predictor(self).predict_batch(tiles)

    @property
    def concurrency(self) -> int:
        """The worker's predictor's (loads it on first use, as the first tile would)."""
        return getattr(worker_predictor(self), "concurrency", 1)


_LOADED: dict[tuple, object] = {}
_LOAD_LOCK = threading.Lock()
LOADS: list[str] = []  # model folders loaded by this process, in order (tests read it on the workers)


def worker_predictor(spec: ModelSpec):
    """The process's :class:`~pronet_wsi.inference.Predictor` for ``spec``, loaded on first use and kept.

    On a CPU Dask worker torch gets as many threads as the worker has Dask threads (the nanny sets
    ``OMP_NUM_THREADS=1`` in worker processes).
    """
    device = worker_device(spec)
    weights = Path(spec.model_dir) / "weights.pt"
    stamp = weights.stat().st_mtime_ns if weights.exists() else 0
    key = (spec.model_dir, stamp, device, spec.inference)
    with _LOAD_LOCK:
        predictor = _LOADED.get(key)
        if predictor is None:
            from pronet_wsi.inference import Predictor

            predictor = Predictor(spec.model_dir, replace(spec.inference, device=device))
            threads = _dask_worker_threads()
            if predictor.device.type == "cpu" and threads:
                import torch

                torch.set_num_threads(threads)
            _LOADED[key] = predictor
            LOADS.append(spec.model_dir)
            log.info("loaded %s on %s", spec.model_dir, predictor.device)
    return predictor


def worker_device(spec: ModelSpec) -> str:
    """The device this process should use for ``spec`` (see :class:`ModelSpec`)."""
    if spec.inference.device != "auto" or not spec.pin_gpus:
        return spec.inference.device
    import torch

    n_gpus = torch.cuda.device_count()
    name = _dask_worker_name()
    if n_gpus == 0 or name is None or not str(name).isdigit():
        return spec.inference.device
    return f"cuda:{int(name) % n_gpus}"


def _dask_worker_name():
    try:
        from distributed import get_worker

        return get_worker().name
    except (ImportError, ValueError):
        return None


def _dask_worker_threads() -> int | None:
    try:
        from distributed import get_worker

        return get_worker().state.nthreads
    except (ImportError, ValueError, AttributeError):
        return None


def remote_predictor(client, predictor, pin_gpus: bool = False):
    """What the tile tasks get: a :class:`ModelSpec` for a model folder, else the object scattered once."""
    if isinstance(predictor, ModelSpec):
        return predictor
    spec = ModelSpec.from_predictor(predictor, pin_gpus)
    if spec is not None:
        return spec
    return client.scatter(predictor, broadcast=True, hash=False)


# -- running batches --------------------------------------------------------------------------------------------
class DaskExecutor:
    """Runs tile batches on the Dask cluster of ``client`` (the executor interface of
    :class:`pronet_wsi.wsi.tile_task.ThreadExecutor`): ``segment_slide(..., executor=DaskExecutor(client))`` or
    :func:`pronet_wsi.wsi.pipeline.run_slides` for many slides. The model reaches the workers once, as a
    :class:`ModelSpec` or scattered (:func:`remote_predictor`)."""

    def __init__(self, client, pin_gpus: bool = False) -> None:
        self.client = client
        self.pin_gpus = pin_gpus
        self._remote: dict[int, tuple] = {}  # id(predictor) -> (predictor, what the tasks get)
        self._on_done: dict[str, object] = {}  # future key -> the caller's on_tile_done

    def submit(self, job, batch, predictor, on_tile_done=None):
        key = id(predictor)
        if key not in self._remote:
            self._remote[key] = (predictor, remote_predictor(self.client, predictor, self.pin_gpus))
        fut = self.client.submit(run_batch, job, batch, self._remote[key][1], pure=False)
        if on_tile_done is not None:
            self._on_done[fut.key] = on_tile_done
        return fut

    def result(self, future) -> list[dict]:
        """The batch's stats; the caller's ``on_tile_done`` runs here, on the client, for each of its tiles."""
        res = future.result()
        on_tile_done = self._on_done.pop(future.key, None)
        if on_tile_done is not None:
            for r in res:
                on_tile_done(r["key"])  # type: ignore[operator]
        return res

    def cancel(self, futures) -> None:
        self.client.cancel([f for f in futures if not f.done()])

    def capacity(self) -> int:
        return max(1, sum(self.client.nthreads().values()))  # workers of a job queue arrive over time

    def close(self) -> None:
        self._remote.clear()
        self._on_done.clear()
