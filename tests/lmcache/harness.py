"""Run LMCache 0.5.6's own code on a CPU-only machine, over loopback only: its controller as a child process,
and real LMCacheEngines (LocalCPUBackend, LMCache's mock GPU connector) with their LMCacheWorker.

Imported by the scripts beside it, which run with .venv-lmcache/bin/python (made by
`bash scripts/install-lmcache`); nothing in kvbus's own venvs imports this.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from lmcache.v1.cache_engine import LMCacheEngine

# Set before lmcache is imported, and inherited by every child process the scripts start.
# LMCache's engine posts usage telemetry to a remote stats server unless told not to; the URL override is
# a closed loopback port, in case any path ignores the opt-out.
os.environ["LMCACHE_TRACK_USAGE"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["LMCACHE_USAGE_TRACK_URL"] = "http://127.0.0.1:9/"
# LMCache falls back to the model hub for some names (cachegen's per-model settings); nothing here may reach it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[2]
LMCACHE_PYTHON = REPO / ".venv-lmcache" / "bin" / "python"
START_TIMEOUT_S = 90.0  # the controller imports torch and transformers: ~5 s alone, far more on a busy 2-core box
STOP_TIMEOUT_S = 10.0


def require_lmcache_venv() -> None:
    """Stop with the install command when this is not .venv-lmcache's interpreter."""
    # find_spec, not import: importing lmcache logs at INFO before a script can lower the level.
    if importlib.util.find_spec("lmcache") is None:
        sys.exit(f"lmcache is not importable here; run `bash scripts/install-lmcache` and use {LMCACHE_PYTHON}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Controller:
    """LMCache's controller (`python -m lmcache.v1.api_server`), bound to 127.0.0.1 on free ports.

    The venv's `lmcache_controller` script is not used: kvbus, installed editable into the same venv, declares
    the same console-script name and its entry point wins.
    """

    http: int = field(default_factory=free_port)
    pull: int = field(default_factory=free_port)
    reply: int = field(default_factory=free_port)
    heartbeat: int = field(default_factory=free_port)
    log_path: Path = Path("/tmp/lmcache-controller.log")
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    @property
    def monitor_ports(self) -> dict[str, int]:
        return {"pull": self.pull, "reply": self.reply, "heartbeat": self.heartbeat}

    def start(self) -> None:
        argv = [sys.executable, "-m", "lmcache.v1.api_server", "--host", "127.0.0.1", "--port", str(self.http)]
        argv += ["--monitor-ports", json.dumps(self.monitor_ports)]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"lmcache controller exited with {self.process.returncode}; see {self.log_path}")
            try:
                httpx.get(f"{self.url}/controller/key-stats", timeout=1.0)
                return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"lmcache controller did not answer within {START_TIMEOUT_S} s; see {self.log_path}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL: 0.5.6's uvicorn waits forever for a request stuck on a silent worker."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT_S)


@contextmanager
def running_controller(log_path: Path | None = None) -> Iterator[Controller]:
    controller = Controller() if log_path is None else Controller(log_path=log_path)
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()


def loopback_only() -> None:
    """Keep LMCacheWorker on 127.0.0.1.

    It reports the address of the host's default route (rpc_utils.get_ip) in RegisterMsg, which the controller
    then connects to, and binds its REP socket on every interface (`*:<port>`). Both names are looked up in the
    worker module at call time, so rebinding them there is enough.
    """
    import lmcache.v1.cache_controller.worker as worker_module

    original = worker_module.get_zmq_socket

    def loopback_socket(context: Any, path: str, protocol: str, role: Any, bind_or_connect: str) -> Any:
        if bind_or_connect == "bind" and path.startswith("*:"):
            path = "127.0.0.1:" + path[2:]
        return original(context, path, protocol, role, bind_or_connect)

    worker_module.get_ip = lambda: "127.0.0.1"
    worker_module.get_zmq_socket = loopback_socket


@dataclass(frozen=True)
class WorkerSpec:
    """One TP rank of one LMCache instance, as vLLM would describe it to LMCache."""

    instance_id: str
    worker_id: int
    world_size: int
    worker_ports: Sequence[int]  # one REP port per rank, indexed by worker_id (lmcache_worker_ports)
    chunk_size: int = 256
    save_unfull_chunk: bool = True
    heartbeat_s: float | None = None  # LMCache's default: no heartbeat
    max_local_cpu_gb: float = 0.05
    # The seed's model: one of the few cachegen knows without asking the model hub.
    model_name: str = "meta-llama/Llama-3.1-8B-Instruct"


def build_engine(spec: WorkerSpec, pull_url: str, reply_url: str) -> LMCacheEngine:
    """A real LMCacheEngine with LocalCPUBackend and its LMCacheWorker, without vLLM or a GPU.

    EngineType.MOCK gives LMCache's MockGPUConnector, whose copies to and from the "GPU" do nothing: a store
    still allocates a CPU memory object per chunk, puts it in LocalCPUBackend and so reports an admit, which is
    all the control plane sees. `pull_url` and `reply_url` are host:port without a scheme, as in LMCache's yaml.
    """
    import torch
    from lmcache.utils import EngineType, mock_up_broadcast_fn, mock_up_broadcast_object_fn
    from lmcache.v1.cache_engine import LMCacheEngineBuilder
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.gpu_connector import CreateGPUConnector
    from lmcache.v1.metadata import LMCacheMetadata

    loopback_only()
    config = LMCacheEngineConfig.from_defaults(
        chunk_size=spec.chunk_size,
        local_cpu=True,
        max_local_cpu_size=spec.max_local_cpu_gb,
        save_unfull_chunk=spec.save_unfull_chunk,
        enable_controller=True,
        lmcache_instance_id=spec.instance_id,
        controller_pull_url=pull_url,
        # Without it 0.5.6's worker never registers (its DEALER socket is only made when this is set).
        controller_reply_url=reply_url,
        lmcache_worker_ports=list(spec.worker_ports),
        lmcache_worker_heartbeat_time=spec.heartbeat_s,
        lmcache_worker_heartbeat_delay_time=1,
    )
    metadata = LMCacheMetadata(
        model_name=spec.model_name,
        world_size=spec.world_size,
        local_world_size=spec.world_size,
        worker_id=spec.worker_id,
        local_worker_id=spec.worker_id,
        kv_dtype=torch.float16,
        # (layers, K/V, chunk tokens, kv heads, head size): 32 layers as cachegen's settings for the model
        # expect, narrow heads so that a chunk is 1 MiB.
        kv_shape=(32, 2, spec.chunk_size, 2, 16),
        role="worker",
    )
    connector = CreateGPUConnector(config, metadata, EngineType.MOCK)
    # The builder caches engines by this key, so each rank in one process needs its own.
    key = f"{spec.instance_id}#{spec.worker_id}"
    engine = LMCacheEngineBuilder.get_or_create(
        key, config, metadata, connector, mock_up_broadcast_fn, mock_up_broadcast_object_fn
    )
    engine.post_init()  # builds the storage manager and so LocalCPUBackend
    return engine


def store(engine: LMCacheEngine, tokens: Sequence[int]) -> None:
    """What vLLM's connector does after a prefill, minus the GPU copy."""
    import torch

    engine.store(torch.tensor(list(tokens), dtype=torch.long))


def close_engine(engine: LMCacheEngine, spec: WorkerSpec) -> None:
    """Close (which pushes DeRegisterMsg) and drop it from the builder's cache."""
    from lmcache.v1.cache_engine import LMCacheEngineBuilder

    LMCacheEngineBuilder.destroy(f"{spec.instance_id}#{spec.worker_id}")
    del engine


def wait_for(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


def compact_json(value: Any, indent: int = 0) -> str:
    """JSON with one key per line but every list of plain values on a single line: token lists stay short."""
    pad = " " * indent
    if isinstance(value, dict) and value:
        items = [f"{pad} {json.dumps(k)}: {compact_json(v, indent + 1).lstrip()}" for k, v in value.items()]
        return pad + "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        return pad + "[\n" + ",\n".join(compact_json(v, indent + 1) for v in value) + "\n" + pad + "]"
    return pad + json.dumps(value)


def write_json(path: Path, value: Any) -> None:
    path.write_text(compact_json(value) + "\n")


def quiet_lmcache_logs() -> None:
    """LMCache logs every step at INFO to stdout; the scripts' own output is what matters."""
    os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")
