"""vLLM is a 500 MB, 11 s import that most kvbus processes never need: only the connector shim may import it."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHIM = REPO / "agent" / "vllm_connector.py"
IMPORTS_VLLM = re.compile(r"^\s*(from|import)\s+vllm\b", re.MULTILINE)


def test_only_the_connector_shim_imports_vllm() -> None:
    folders = ("agent", "shared", "controller", "kvbus", "engine")
    sources = [p for folder in folders for p in (REPO / folder).rglob("*.py")]
    offenders = [str(p.relative_to(REPO)) for p in sources if p != SHIM and IMPORTS_VLLM.search(p.read_text())]
    assert offenders == []
    assert IMPORTS_VLLM.search(SHIM.read_text())
