"""One log format for kvbus's own processes. Library code only logs; it never configures logging."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from kvbus import __version__
from kvbus.shared.config import CONFIG_FILE_ENV


def setup(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def config_name(path: str | None) -> str:
    """The config file a process reads (`path`, else $LMCACHE_CONFIG_FILE, as config.load() picks), for its logs."""
    chosen = path or os.environ.get(CONFIG_FILE_ENV)
    return str(Path(chosen).resolve()) if chosen else "none (built-in defaults)"


def run_facts(config_path: str | None) -> str:
    """What a process's first line names, beside the time every line carries: the version and the config."""
    return f"kvbus {__version__}, config {config_name(config_path)}"
