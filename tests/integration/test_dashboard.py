"""The dashboard in real headless Chromium, against a controller process and live agents holding known chunks:
the rendered page must show the fleet's true numbers, and show instance ids as text, never as markup."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import redis

from kvbus.shared import keys
from kvbus.shared.records import BackendStats, FleetEntry, LifecycleEntry, LifecycleKind, WorkerRecord
from tests.conftest import Processes, wait_for

PLAIN = "dash-a"
# Markup and an entity in an instance id: the page must show them as they are, and build no element from them.
SECOND = "dash-b"
# No agent may take this id (the instance id rule refuses it), but anything that can write to Redis
# can: the test writes its registration by hand, and the page must show it as text.
HOSTILE = "dash-<b>b<img>\"'&amp;"
PROMPT_A = list(range(5000, 5600))  # 3 chunks: 256, 256, 88 tokens
PROMPT_B = list(range(7000, 7300))  # 2 chunks: 256, 44 tokens
KV_BYTES_PER_TOKEN = 2 * 4 * 2 * 16 * 2  # synthetic KV: K and V, 4 layers, 2 heads of 16, float16
VOID = {"meta", "link", "br", "img", "input", "hr", "source", "wbr"}


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    children: list[Element | str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def walk(self) -> list[Element]:
        found = [self]
        for child in self.children:
            if isinstance(child, Element):
                found += child.walk()
        return found

    def find(self, tag: str | None = None, **attrs: str) -> list[Element]:
        wanted = {name.replace("_", "-"): value for name, value in attrs.items()}
        return [
            e
            for e in self.walk()
            if (tag is None or e.tag == tag) and all(e.attrs.get(name) == value for name, value in wanted.items())
        ]

    def one(self, tag: str | None = None, **attrs: str) -> Element:
        found = self.find(tag, **attrs)
        assert len(found) == 1, f"{len(found)} <{tag}> elements with {attrs}"
        return found[0]

    def cell(self, name: str) -> str:
        return self.one("td", data_field=name).text()


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self._stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {name: value or "" for name, value in attrs})
        self._stack[-1].children.append(element)
        if tag not in VOID:
            self._stack.append(element)

    def handle_endtag(self, tag: str) -> None:
        while len(self._stack) > 1:
            if self._stack.pop().tag == tag:
                break

    def handle_data(self, data: str) -> None:
        self._stack[-1].children.append(data)


def rendered(url: str, profile: Path) -> Element:
    """The page's DOM after its scripts ran for a few seconds of virtual time."""
    browser = shutil.which("chromium")
    assert browser is not None
    dom = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=3000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    ).stdout
    builder = _TreeBuilder()
    builder.feed(dom)
    return builder.root


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(url, json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def register_by_hand(client: redis.Redis, instance_id: str) -> None:
    """An instance's registration, heartbeat (with its fleet entry) and lifecycle entry as Redis would hold them,
    with no agent behind."""
    now = time.time()
    record = WorkerRecord(instance_id=instance_id, worker_id=0, ip="127.0.0.1", registration_time=now)
    pipe = client.pipeline()
    pipe.sadd(keys.INSTANCES, instance_id)
    pipe.sadd(keys.workers(instance_id), 0)
    pipe.hset(keys.worker(instance_id, 0), mapping={**record.encode(), **WorkerRecord.heartbeat(now, None)})
    pipe.set(keys.alive(instance_id), 0, px=120_000)
    beat = FleetEntry(last_heartbeat_time=now, ip="127.0.0.1")
    pipe.hset(keys.fleet_shard(instance_id), keys.head_member(instance_id, 0), beat.encode())
    entry = LifecycleEntry(kind=LifecycleKind.REGISTERED, instance_id=instance_id, worker_id=0)
    pipe.xadd(keys.LIFECYCLE, entry.encode())
    pipe.execute()


def stats(client: redis.Redis, instance_id: str) -> dict[str, BackendStats]:
    """What the worker's last fleet entry says it holds: what the dashboard shows."""
    value = client.hget(keys.fleet_shard(instance_id), keys.head_member(instance_id, 0))
    return (msgspec.json.decode(value, type=FleetEntry).stats if value else None) or {}


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="chromium is not installed (scripts/test installs it as root: apt-get install chromium)",
)
@pytest.mark.timeout(180)
def test_the_dashboard_shows_the_fleets_real_numbers(procs: Processes, redis_url: str, tmp_path: Path) -> None:
    _, controller = procs.controller(redis_url)
    disk = {"local_disk": str(tmp_path / "disk"), "max_local_disk_size": 1}
    procs.agent(redis_url, PLAIN, "--preload-tokens", ",".join(map(str, PROMPT_A)), config=disk)
    procs.agent(redis_url, SECOND, "--preload-tokens", ",".join(map(str, PROMPT_B)))
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    wait_for(lambda: client.hlen(keys.index(PLAIN, 0, "LocalDiskBackend")) == 3, what="the disk to hold PROMPT_A")
    assert post(f"{controller}/lookup", {"tokens": PROMPT_A})["layout_info"] == {PLAIN: ["LocalCPUBackend", 600]}
    assert post(f"{controller}/lookup", {"tokens": PROMPT_B})["layout_info"] == {SECOND: ["LocalCPUBackend", 300]}
    assert post(f"{controller}/lookup", {"tokens": [1, 2, 3]})["layout_info"] == {}
    cleared = post(f"{controller}/clear", {"instance_id": SECOND, "location": "LocalCPUBackend"})
    assert cleared["num_tokens"] == 300
    wait_for(
        lambda: (
            stats(client, SECOND)["LocalCPUBackend"].chunks == 0
            and stats(client, PLAIN).get("LocalDiskBackend", BackendStats()).chunks == 3
        ),
        what="heartbeats with the agents' stats",
    )

    register_by_hand(client, HOSTILE)

    page = rendered(f"{controller}/", tmp_path / "chromium")

    assert page.one(id="connection").text().startswith("live"), page.one(id="connection").text()
    assert page.one(id="instances-count").text() == "3 / 3"
    assert page.one(id="workers-count").text() == "3 / 3"
    assert page.one(id="chunks-count").text() == "6"  # PROMPT_A in memory and on disk; PROMPT_B cleared
    assert page.one(id="hit-ratio").text() == "66.7 %"
    assert page.one(id="lookup-counts").text() == "2 hits, 1 misses"

    instances, workers, storage = (page.one("table", id=name) for name in ("instances", "workers", "storage"))
    plain = instances.one("tr", data_instance=PLAIN)
    assert [c.text() for c in plain.find("td", data_field="index_chunks")] == ["3", "3"]  # disk, then CPU
    assert plain.cell("workers") == "1 / 1" and plain.cell("alive") == "yes"
    second = instances.one("tr", data_instance=SECOND)
    assert second.one("td", data_field="index_chunks", data_location="LocalCPUBackend").text() == "0"
    assert instances.one("tr", data_instance=HOSTILE).cell("instance_id") == HOSTILE
    assert not page.find("b") and not page.find("img"), "an instance id became markup"

    memory = storage.one("tr", data_instance=PLAIN, data_worker="0", data_location="LocalCPUBackend")
    assert (memory.cell("chunks"), memory.cell("tokens")) == ("3", "600")
    assert memory.one("td", data_field="bytes").attrs["data-value"] == str(600 * KV_BYTES_PER_TOKEN)
    assert memory.cell("bytes") == "300.0 KiB"
    on_disk = storage.one("tr", data_instance=PLAIN, data_worker="0", data_location="LocalDiskBackend")
    assert on_disk.cell("chunks") == "3"
    assert on_disk.one("td", data_field="bytes").attrs["data-value"] == str(
        stats(client, PLAIN)["LocalDiskBackend"].bytes
    )
    emptied = storage.one("tr", data_instance=SECOND, data_worker="0", data_location="LocalCPUBackend")
    assert (emptied.cell("chunks"), emptied.cell("bytes")) == ("0", "0 B")

    for instance_id in (PLAIN, SECOND, HOSTILE):
        worker = workers.one("tr", data_instance=instance_id, data_worker="0")
        assert worker.cell("alive") == "yes"
        assert float(worker.cell("heartbeat_age").removesuffix(" s")) < 5
        # The hand-written registration has no command stream, so no consumer group to count.
        assert worker.cell("unacked_commands") == ("no group" if instance_id == HOSTILE else "0")

    clear = page.one("tr", data_event=cleared["event_id"])
    assert clear.cell("kind") == "clear" and clear.cell("status") == "finished"
    assert clear.cell("num_tokens") == "300" and clear.cell("instance_id") == SECOND
    assert clear.cell("workers") == "0: ok 300"
    assert page.one("table", id="answered").one("tr", data_kind="clear").cell("ok") == "1"
    lifecycle = page.one("table", id="agent-events")
    registered = [row.cell("instance_id") for row in lifecycle.find("tr", data_kind="registered")]
    assert sorted(registered) == sorted([PLAIN, SECOND, HOSTILE])
