"""Does LMCache 0.5.6's own vLLM connector (LMCacheConnectorV1) work inside CPU vLLM 0.32? It does not: vLLM
serves, but LMCache's engine fails to build and nothing registers with the controller. This shows it.

Run: .venv-lmcache/bin/python tests/lmcache/vllm_connector_probe.py   (about 2 minutes on 2 cores)
Needs .venv-vllm (`bash scripts/install-vllm`). lmcache is not installed there (its numpy and transformers
pins would change that venv); instead vLLM gets a PYTHONPATH folder holding links to lmcache's package and to
the three pure-Python packages it needs that .venv-vllm lacks. LMCache's controller runs too, with the
instance configured to join it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
import httpx

VLLM_PYTHON = harness.REPO / ".venv-vllm" / "bin" / "python"
TINY_MODEL = harness.REPO / "tests" / "vllm" / "tiny_model.py"
# What lmcache's vLLM adapter imports beyond what .venv-vllm has (dist-info too: caio reads its own metadata).
EXTRA_PACKAGES = ["sortedcontainers", "aiofile", "caio"]
START_TIMEOUT_S = 280.0
FAILURE = "No supported cpu connector found"


def shim(folder: Path) -> None:
    import lmcache

    site = Path(lmcache.__file__).parents[1]
    (folder / "lmcache").symlink_to(site / "lmcache")
    for name in EXTRA_PACKAGES:
        for entry in [site / name, *site.glob(f"{name}-*.dist-info")]:
            (folder / entry.name).symlink_to(entry)


def start_vllm(work: Path, controller: harness.Controller, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(work / "shim"),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "PYTHONUNBUFFERED": "1",
        # LMCache's engine configuration, from the environment as LMCache reads it.
        "LMCACHE_CHUNK_SIZE": "256",
        "LMCACHE_LOCAL_CPU": "True",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": "0.5",
        "LMCACHE_SAVE_UNFULL_CHUNK": "True",
        "LMCACHE_ENABLE_CONTROLLER": "True",
        "LMCACHE_LMCACHE_INSTANCE_ID": "vllm_cpu",
        "LMCACHE_CONTROLLER_PULL_URL": f"127.0.0.1:{controller.pull}",
        "LMCACHE_CONTROLLER_REPLY_URL": f"127.0.0.1:{controller.reply}",
        "LMCACHE_LMCACHE_WORKER_PORTS": str(harness.free_port()),
    }
    transfer = {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
    args = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(work / "model")]
    args += ["--served-model-name", "tiny", "--dtype", "bfloat16", "--max-model-len", "4096"]
    args += ["--no-enable-prefix-caching", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--kv-transfer-config", json.dumps(transfer)]
    with (work / "vllm.log").open("wb") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(process: subprocess.Popen[bytes]) -> None:
    """By process group: EngineCore and the worker are children of the API server."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def wait_up(process: subprocess.Popen[bytes], url: str) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return False


def main() -> None:
    harness.quiet_lmcache_logs()
    harness.require_lmcache_venv()
    if not VLLM_PYTHON.exists():
        sys.exit("no .venv-vllm: run `bash scripts/install-vllm` first")
    with tempfile.TemporaryDirectory() as tmp, harness.running_controller() as controller:
        work = Path(tmp)
        (work / "shim").mkdir()
        shim(work / "shim")
        subprocess.run(
            [str(VLLM_PYTHON), str(TINY_MODEL), str(work / "model")], check=True, capture_output=True, timeout=300
        )
        port = harness.free_port()
        process = start_vllm(work, controller, port)
        try:
            up = wait_up(process, f"http://127.0.0.1:{port}")
            print(f"vLLM serving: {up}")
            if up:
                body = {"model": "tiny", "prompt": list(range(1000, 1300)), "max_tokens": 1}
                answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120)
                print(f"completion: {answer.status_code}")
                time.sleep(2)  # what a working engine would admit would arrive within milliseconds
        finally:
            stop(process)
        stats = httpx.get(f"{controller.url}/controller/key-stats", timeout=5).json()
        print(f"controller after the completion: {json.dumps(stats)}")
        log = (work / "vllm.log").read_text(errors="replace")
        lines = [line for line in log.splitlines() if FAILURE in line or "LMCacheManager" in line]
        print("\n".join(lines[-5:]) or log[-3000:])
        print(f"verdict: LMCacheConnectorV1 on CPU vLLM {'fails' if FAILURE in log else 'did not fail as expected'}")


if __name__ == "__main__":
    main()
