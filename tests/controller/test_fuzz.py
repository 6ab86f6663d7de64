"""A property-based run of the whole API from its own /openapi.json (schemathesis): generated requests,
valid and not, to every operation of a controller process with an API token set and an agent holding
chunks. Every answer must be documented for its operation and status and valid against its schema, and
none a server error; schemathesis's other checks (a 405 with Allow for a method the path does not take,
a 401 without the token, a refusal of data the schema forbids) run too. Bounded to about a minute."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks
from schemathesis.checks import CheckContext

from kvbus.controller import openapi
from tests.conftest import SEED_TOKENS, Processes, RedisServer, free_port, wait_for
from tests.controller.conftest import check_answer

TOKEN = "kvbus-fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = 500  # per operation: about a minute for the 17 operations


@pytest.fixture(scope="module")
def controller(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A controller process (commands time out in 0.5 s) and an agent of lmcache_default_instance holding the
    seed prompt, on a Redis of their own: Redis is flushed once, here, not between examples."""
    tmp = tmp_path_factory.mktemp("fuzz")
    procs = Processes(tmp)
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if k != "LMCACHE_CONFIG_FILE"}, "KVBUS_API_TOKEN": TOKEN}
    with (tmp / "controller.log").open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kvbus",
                "controller",
                "--port",
                str(port),
                "--redis-url",
                redis_server.url,
                "--command-timeout",
                "0.5",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{base}/healthz").status_code == 200, what="controller /healthz")
        procs.agent(redis_server.url, "lmcache_default_instance", "--preload-tokens", ",".join(map(str, SEED_TOKENS)))
        yield base
    finally:
        procs.stop_all()
        process.terminate()
        process.wait(20)
        assert "Traceback" not in (tmp / "controller.log").read_text()


# What GET /openapi.json serves (test_openapi.py checks that it is this): built in process, so that pytest can
# collect one test per operation before any controller runs.
schema = schemathesis.openapi.from_dict(openapi.spec())


def documented_answer(ctx: CheckContext, response: schemathesis.Response, case: schemathesis.Case) -> bool:
    """The answer fits the schema /openapi.json gives for its path, method and status (JSON Schema 2020-12, as
    every controller test checks it): schemathesis's own response_schema_conformance rewrites the tuples'
    prefixItems into draft 4's item lists, then refuses its own rewrite as an invalid 3.1 schema."""
    headers = [(name, value) for name, values in response.headers.items() for value in values]
    check_answer(
        case.method, case.path, httpx.Response(response.status_code, headers=headers, content=response.content)
    )
    return True


# Left to other checks: kvbus reads bodies in pydantic's lax mode, as LMCache does ("12", 12.0 and true pass
# as ints), so data the schema calls invalid may be accepted; that none of it is a 5xx, not_a_server_error
# checks, and documented_answer that each refusal is a documented 4xx.
EXCLUDED = [checks.negative_data_rejection, checks.response_schema_conformance]


def _onto_itself(body: Any) -> bool:
    """A move onto its own position: a 422 by a rule the schema cannot say (two fields equal)."""
    return isinstance(body, dict) and "old_position" in body and body["old_position"] == body.get("new_position")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@pytest.mark.timeout(300)
def test_every_answer_is_documented_valid_and_no_server_error(case: schemathesis.Case, controller: str) -> None:
    excluded = [*EXCLUDED, checks.positive_data_acceptance] if _onto_itself(case.body) else EXCLUDED
    case.call_and_validate(
        base_url=controller, headers=AUTH, additional_checks=[documented_answer], excluded_checks=excluded
    )
