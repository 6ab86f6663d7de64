"""One process of real LMCache 0.5.6 engines (harness.build_engine: LocalCPUBackend, LMCache's mock GPU connector,
and each engine's own LMCacheWorker), driven one JSON line at a time over stdin and stdout.

Run by the LMCache tier (tests/lmcache/test_*.py) with .venv-lmcache/bin/python:

    engine_driver.py --instance ID --ranks 0,1 --world-size 2 --worker-ports P0,P1 \
        --pull 127.0.0.1:P --reply 127.0.0.1:P [--heartbeat-s S]

builds one engine per rank named in --ranks (TP ranks of one instance may share a process: LMCache's builder
keys engines by instance and rank), prints `{"ready": [ranks]}`, then answers each request line:

    {"op": "store", "rank": 0, "tokens": [...]}     -> {"ok": true}              engine.store, as after a prefill
    {"op": "lookup", "rank": 0, "tokens": [...]}    -> {"ok": true, "tokens": n} the prefix the engine holds
    {"op": "retrieve", "rank": 0, "tokens": [...]}  -> {"ok": true, "tokens": n} the tokens a retrieve loads
    {"op": "close"}                                 -> {"ok": true}, then exits

A request that fails is answered `{"ok": false, "error": "..."}`. The process exits when stdin closes.
Only these answers go to stdout: whatever LMCache prints goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO

import harness


def _answers() -> TextIO:
    """The real stdout, for answers only; fd 1 then points at stderr, so LMCache's prints stay out of it."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return answers


def _serve(engines: dict[int, Any], request: dict[str, Any]) -> dict[str, Any]:
    import torch

    op = request["op"]
    if op == "close":
        return {"ok": True}
    engine = engines[int(request["rank"])]
    tokens = [int(t) for t in request["tokens"]]
    if op == "store":
        harness.store(engine, tokens)
        return {"ok": True}
    if op == "lookup":
        return {"ok": True, "tokens": int(engine.lookup(tokens))}
    if op == "retrieve":
        mask = engine.retrieve(torch.tensor(tokens, dtype=torch.long))
        return {"ok": True, "tokens": int(mask.sum().item())}
    return {"ok": False, "error": f"unknown op {op!r}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--instance", required=True)
    parser.add_argument("--ranks", required=True, help="comma-separated worker ids this process hosts")
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--worker-ports", required=True, help="comma-separated REP ports, one per rank of the world")
    parser.add_argument("--pull", required=True, help="controller pull socket, host:port")
    parser.add_argument("--reply", required=True, help="controller reply socket, host:port")
    parser.add_argument("--heartbeat-s", type=float, default=None, help="LMCache's heartbeat period (default: none)")
    args = parser.parse_args()
    harness.quiet_lmcache_logs()
    harness.require_lmcache_venv()
    answers = _answers()
    ports = [int(p) for p in args.worker_ports.split(",")]
    specs = {
        rank: harness.WorkerSpec(args.instance, rank, args.world_size, ports, heartbeat_s=args.heartbeat_s)
        for rank in (int(r) for r in args.ranks.split(","))
    }
    engines = {rank: harness.build_engine(spec, args.pull, args.reply) for rank, spec in specs.items()}
    answers.write(json.dumps({"ready": sorted(engines)}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            answer = _serve(engines, request)
        except Exception as exc:  # noqa: BLE001 - the test reads the failure; the driver serves on
            request, answer = {}, {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        answers.write(json.dumps(answer) + "\n")
        if request.get("op") == "close":
            break
    for rank, engine in engines.items():
        harness.close_engine(engine, specs[rank])
    # LMCache leaves non-daemon threads behind; the answers are written, so leave at once.
    os._exit(0)


if __name__ == "__main__":
    main()
