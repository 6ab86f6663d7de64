"""Real vLLM, from .venv-vllm (made by `bash scripts/install-vllm`), serving a tiny model with the kvbus
connector: shared by tests/vllm and bench/vllm_prefill.py. Runs in the main venv; vLLM runs in its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
EXAMPLE_CONFIG = REPO / "configs" / "example.yaml"
SERVED_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
SKIP_ENV = "KVBUS_VLLM"
CONNECTOR = {
    "kv_connector": "KVBusConnector",
    "kv_connector_module_path": "kvbus.agent.vllm_connector",
    "kv_role": "kv_both",
}
START_TIMEOUT_S = 300.0  # 50-100 s on 2 cores, more with the first inductor compile


def unavailable() -> str | None:
    """Why the vLLM tier cannot run here, or None."""
    if os.environ.get(SKIP_ENV) == "0":
        return f"{SKIP_ENV}=0"
    if not VLLM_PYTHON.exists():
        return f"no {VLLM_PYTHON.relative_to(REPO)}: run `bash scripts/install-vllm` (about 2.5 min, 2.5 GB)"
    return None


def build_model(out: Path) -> Path:
    """The tiny random-weight model and its tokenizer, written by the vLLM venv's python."""
    subprocess.run(
        [str(VLLM_PYTHON), str(Path(__file__).with_name("tiny_model.py")), str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


@dataclass
class VLLMServer:
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    started_in_s: float

    def complete(self, prompt: str | Sequence[int], **params: Any) -> dict[str, Any]:
        body = {
            "model": SERVED_MODEL,
            "prompt": prompt if isinstance(prompt, str) else list(prompt),
            "max_tokens": 1,
            "temperature": 0,
            **params,
        }
        response = httpx.post(f"{self.url}/v1/completions", json=body, timeout=120)
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@contextlib.contextmanager
def vllm_server(
    model_dir: Path, redis_url: str, port: int, log: Path, extra_config: dict[str, Any] | None = None
) -> Iterator[VLLMServer]:
    """`python -m vllm.entrypoints.openai.api_server` with the kvbus connector, the seed's engine yaml
    and Redis at `redis_url`; ready once /health answers. Stopped by pid (and its process group)."""
    transfer = {**CONNECTOR, "kv_connector_extra_config": {"redis_url": redis_url, **(extra_config or {})}}
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")},
        "LMCACHE_CONFIG_FILE": str(EXAMPLE_CONFIG),
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    args = [
        str(VLLM_PYTHON),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        SERVED_MODEL,
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "4096",
        "--no-enable-prefix-caching",
        "--enable-prompt-tokens-details",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--kv-transfer-config",
        json.dumps(transfer),
    ]
    started = time.monotonic()
    with log.open("ab") as out:
        # Its own session, so that stopping it reaches EngineCore and the worker too.
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = VLLMServer(process, f"http://127.0.0.1:{port}", log, 0.0)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {process.returncode} while starting:\n{server.log_tail()}")
            if time.monotonic() - started > START_TIMEOUT_S:
                raise TimeoutError(f"vLLM not up after {START_TIMEOUT_S:.0f} s:\n{server.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        server.started_in_s = time.monotonic() - started
        yield server
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
            process.wait(10)
