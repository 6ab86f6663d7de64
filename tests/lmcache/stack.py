"""What the LMCache tier runs, from the main venv: kvbus's controller with LMCache's monitor sockets, and real
LMCache 0.5.6 engines in .venv-lmcache processes (engine_driver.py), each reached over its stdin and stdout.

Every process is started here and stopped by its pid; every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Processes, free_port, wait_for, write_config

REPO = Path(__file__).resolve().parents[2]
LMCACHE_PYTHON = REPO / ".venv-lmcache" / "bin" / "python"
DRIVER = Path(__file__).with_name("engine_driver.py")
SKIP_ENV = "KVBUS_LMCACHE"
CPU = "LocalCPUBackend"
ENGINE_START_S = 120.0  # torch and lmcache imports: ~5 s alone, several at once on 2 cores take far longer
REQUEST_S = 30.0
# LMCache's engine posts usage telemetry unless told not to, and may ask the model hub; nothing may leave the box.
_OFFLINE = {
    "LMCACHE_TRACK_USAGE": "false",
    "DO_NOT_TRACK": "1",
    "LMCACHE_USAGE_TRACK_URL": "http://127.0.0.1:9/",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "LMCACHE_LOG_LEVEL": "WARNING",
}


def unavailable() -> str | None:
    """Why real LMCache engines cannot run here, or None."""
    if os.environ.get(SKIP_ENV) == "0":
        return f"{SKIP_ENV}=0"
    if not LMCACHE_PYTHON.exists():
        return f"no {LMCACHE_PYTHON.relative_to(REPO)}: run `bash scripts/install-lmcache` (about 80 s, 1.9 GB)"
    return None


@dataclass(frozen=True)
class MonitorPorts:
    pull: int = field(default_factory=free_port)
    reply: int = field(default_factory=free_port)
    heartbeat: int = field(default_factory=free_port)

    def flag(self) -> str:
        return json.dumps({"pull": self.pull, "reply": self.reply, "heartbeat": self.heartbeat})


class Stack(Processes):
    """Processes.stop_all() kills every process started here (controllers, agents, engine drivers) by pid."""

    def __init__(self, tmp_path: Path, redis_url: str) -> None:
        super().__init__(tmp_path)
        self.redis_url = redis_url
        self.ports = MonitorPorts()
        # The controller would take its own PYTHONHASHSEED for the engines' (as vLLM-hosted engines use it);
        # these engines run without vLLM, so their chunk hashes start from 0 whatever the seed.
        self._env.pop("PYTHONHASHSEED", None)
        self.engines: list[EngineDriver] = []

    def lmcache_controller(self, *, command_timeout: float = 3.0) -> tuple[subprocess.Popen[bytes], str]:
        """`python -m kvbus controller --monitor-ports ...` on the stack's monitor ports, once /healthz answers."""
        port = free_port()
        config = write_config(
            self.tmp / f"controller-{port}.yaml",
            redis_url=self.redis_url,
            heartbeat_interval=0.5,
            heartbeat_ttl=3.0,
            command_timeout=command_timeout,
        )
        argv = ["controller", "--port", str(port), "--config", str(config), "--monitor-ports", self.ports.flag()]
        proc = self._spawn(argv, f"controller-{port}.log")
        base = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"controller exited with {proc.returncode}: {self.log(f'controller-{port}.log')}")
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200

        wait_for(healthy, timeout=30, what="controller /healthz")
        return proc, base

    def start_engines(self, specs: Sequence[EngineSpec]) -> list[EngineDriver]:
        """One engine_driver.py process per spec, all started before any is waited for."""
        started = [EngineDriver.spawn(spec, self.ports, self.tmp, self._procs) for spec in specs]
        self.engines += started
        for driver in started:
            driver.wait_ready()
        return started

    def stop_all(self) -> None:
        super().stop_all()
        for driver in self.engines:
            driver.close_pipes()


@dataclass(frozen=True)
class EngineSpec:
    """The ranks of one LMCache instance that one driver process hosts."""

    instance_id: str
    ranks: tuple[int, ...] = (0,)
    world_size: int = 1
    heartbeat_s: float | None = None  # LMCache's default: no heartbeats


class EngineDriver:
    """A running engine_driver.py: its ranks' engines store, look up and retrieve on request."""

    def __init__(self, spec: EngineSpec, proc: subprocess.Popen[str], worker_ports: list[int], log: Path) -> None:
        self.spec, self.process, self.worker_ports, self.log = spec, proc, worker_ports, log
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"driver-{spec.instance_id}", daemon=True)
        self._reader.start()

    @classmethod
    def spawn(
        cls, spec: EngineSpec, ports: MonitorPorts, tmp: Path, registry: list[subprocess.Popen[Any]]
    ) -> EngineDriver:
        worker_ports = [free_port() for _ in range(spec.world_size)]
        argv = [str(LMCACHE_PYTHON), str(DRIVER), "--instance", spec.instance_id]
        argv += ["--ranks", ",".join(map(str, spec.ranks)), "--world-size", str(spec.world_size)]
        argv += ["--worker-ports", ",".join(map(str, worker_ports))]
        argv += ["--pull", f"127.0.0.1:{ports.pull}", "--reply", f"127.0.0.1:{ports.reply}"]
        if spec.heartbeat_s is not None:
            argv += ["--heartbeat-s", str(spec.heartbeat_s)]
        log = tmp / f"engine-{spec.instance_id}-{'-'.join(map(str, spec.ranks))}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_") and k != "PYTHONHASHSEED"}
        with log.open("ab") as err:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env={**env, **_OFFLINE, "PYTHONUNBUFFERED": "1"},
            )
        registry.append(proc)  # type: ignore[arg-type]
        return cls(spec, proc, worker_ports, log)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _next(self, timeout_s: float, what: str) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"LMCache engine {self.spec.instance_id}: no {what} within {timeout_s} s") from None
        if line is None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"LMCache engine {self.spec.instance_id} exited ({self.process.poll()}):\n{tail}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def wait_ready(self) -> None:
        answer = self._next(ENGINE_START_S, "ready line")
        assert answer == {"ready": list(self.spec.ranks)}, answer

    def request(self, op: str, tokens: Sequence[int], rank: int = 0) -> int:
        """store, lookup or retrieve `tokens` on rank `rank`; returns the token count the engine answered."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, "rank": rank, "tokens": list(tokens)}) + "\n")
        self.process.stdin.flush()
        answer = self._next(REQUEST_S, f"answer to {op}")
        if not answer.get("ok"):
            raise RuntimeError(f"LMCache engine {self.spec.instance_id} rank {rank}: {op} failed: {answer}")
        return int(answer.get("tokens", 0))

    def store(self, tokens: Sequence[int], rank: int = 0) -> None:
        self.request("store", tokens, rank)

    def held(self, tokens: Sequence[int], rank: int = 0) -> int:
        """The prefix of `tokens` the engine itself says it holds (LMCacheEngine.lookup)."""
        return self.request("lookup", tokens, rank)

    def close_pipes(self) -> None:
        """Once the process is gone: its stdout ends, so the reader thread ends before the pipe is closed."""
        self._reader.join(5)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()

    def pause(self) -> None:
        """SIGSTOP: a hung engine, whose REP socket takes requests and never answers."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)
