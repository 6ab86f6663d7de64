// The kvbus dashboard: polls dashboard.json and rebuilds its tables. Every value reaches the DOM as
// text or an attribute (never as HTML), because instance ids, details and hostnames are user data.
"use strict";

const REFRESH_MS = 1000;
// A large fleet makes each refresh cost the controller more; spacing refreshes at ten times their
// duration keeps an open dashboard under a tenth of the controller's time.
const SPACING_FACTOR = 10;
let interval = REFRESH_MS;
const OUTCOMES = ["ok", "timeout", "failed", "refused"];
let lastGood = null; // when the last refresh succeeded, in ms
// With an API token set, the page is public but its data is not. The token is asked for on the page, or
// given in the address as #token=… (a fragment never reaches a server, its logs or a Referer), and kept
// in this tab's sessionStorage only, sent as a bearer header: no cookie, so no other site can use it.
const TOKEN_KEY = "kvbus-api-token";

function takeTokenFromAddress() {
  const match = /^#token=(.+)$/.exec(location.hash);
  if (match) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
}

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function askForToken(asked) {
  document.getElementById("token-form").hidden = !asked;
  document.body.dataset.state = asked ? "token-required" : "live";
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(name, String(value));
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : String(child ?? ""));
  }
  return node;
}

function num(value, field, extra) {
  return el("td", { class: "num", "data-field": field, ...extra }, value === null || value === undefined ? "–" : value);
}

function fmtInt(n) {
  return n === null || n === undefined ? "–" : n.toLocaleString("en-US");
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${n} B` : `${value.toFixed(1)} ${units[unit]}`;
}

function fmtAge(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  if (seconds < 3600) return `${(seconds / 60).toFixed(1)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function fmtTime(epochSeconds) {
  return new Date(epochSeconds * 1000).toLocaleTimeString("en-GB", { hour12: false });
}

function statusCell(status, field) {
  return el("td", { class: `status-${status}`, "data-field": field }, status);
}

function fill(tableId, headers, rows, emptyText) {
  const table = document.getElementById(tableId);
  table.tHead.replaceChildren(el("tr", {}, ...headers.map((h) => el("th", { scope: "col" }, h))));
  const body = rows.length ? rows : [el("tr", {}, el("td", { class: "empty", colspan: headers.length }, emptyText))];
  table.tBodies[0].replaceChildren(...body);
}

function renderSummary(data) {
  const instances = data.instances;
  const alive = instances.filter((i) => i.alive).length;
  const workers = instances.reduce((sum, i) => sum + i.workers_registered, 0);
  const workersAlive = instances.reduce((sum, i) => sum + i.workers_alive, 0);
  const chunks = instances.reduce((sum, i) => sum + Object.values(i.index_chunks).reduce((a, b) => a + b, 0), 0);
  let bytes = 0;
  let reporting = 0;
  for (const instance of instances) {
    for (const worker of instance.workers) {
      if (!worker.stats) continue;
      reporting += 1;
      for (const stats of Object.values(worker.stats)) bytes += stats.bytes || 0;
    }
  }
  document.getElementById("instances-count").textContent = `${alive} / ${instances.length}`;
  document.getElementById("workers-count").textContent = `${workersAlive} / ${workers}`;
  document.getElementById("chunks-count").textContent = fmtInt(chunks);
  const held = document.getElementById("bytes-held");
  held.textContent = reporting ? fmtBytes(bytes) : "–";
  held.title = reporting ? `${bytes} bytes, from ${reporting} of ${workers} workers` : "no worker reports its stats";
  held.dataset.value = reporting ? bytes : "";
  const { hits, misses, hit_ratio: ratio } = data.lookups;
  document.getElementById("hit-ratio").textContent = ratio === null ? "no lookups yet" : `${(ratio * 100).toFixed(1)} %`;
  document.getElementById("lookup-counts").textContent = `${hits} hits, ${misses} misses`;
}

function renderInstances(data) {
  const rows = data.instances.map((i) => el("tr", { "data-instance": i.instance_id },
    el("td", { "data-field": "instance_id" }, el("code", {}, i.instance_id)),
    statusCell(i.alive ? "yes" : "no", "alive"),
    num(`${i.workers_alive} / ${i.workers_registered}`, "workers"),
    ...data.locations.map((loc) => num(fmtInt(i.index_chunks[loc] ?? 0), "index_chunks", { "data-location": loc }))));
  fill("instances", ["instance", "heartbeat", "workers alive / registered",
    ...data.locations.map((loc) => `chunks at ${loc}`)], rows, "No instance is registered.");
}

function renderWorkers(data) {
  const rows = [];
  for (const i of data.instances) {
    for (const w of i.workers) {
      rows.push(el("tr", { "data-instance": i.instance_id, "data-worker": w.worker_id },
        el("td", {}, el("code", {}, i.instance_id)),
        num(w.worker_id, "worker_id"),
        el("td", { "data-field": "host" }, `${w.hostname || "?"} (${w.ip || "?"}) pid ${w.pid ?? "?"}`),
        num(fmtAge(w.heartbeat_age_s), "heartbeat_age", { title: "since its last heartbeat" }),
        statusCell(w.alive ? "yes" : "no", "alive"),
        num(w.unacked_commands ?? "no group", "unacked_commands"),
        num(fmtAge(w.oldest_unacked_age_s), "oldest_unacked_age")));
    }
  }
  fill("workers", ["instance", "worker", "host", "last heartbeat", "alive", "unacked commands",
    "oldest unacked command"], rows, "No worker is registered.");
}

function renderStorage(data) {
  const rows = [];
  for (const i of data.instances) {
    for (const w of i.workers) {
      for (const [loc, s] of Object.entries(w.stats || {})) {
        rows.push(el("tr", { "data-instance": i.instance_id, "data-worker": w.worker_id, "data-location": loc },
          el("td", {}, el("code", {}, i.instance_id)),
          num(w.worker_id, "worker_id"),
          el("td", { "data-field": "location" }, loc),
          num(fmtInt(s.chunks), "chunks"),
          num(fmtInt(s.tokens), "tokens"),
          num(fmtBytes(s.bytes), "bytes", { "data-value": s.bytes, title: `${s.bytes} bytes` }),
          num(fmtBytes(s.capacity_bytes), "capacity_bytes", { "data-value": s.capacity_bytes }),
          num(s.capacity_bytes ? `${((100 * s.bytes) / s.capacity_bytes).toFixed(1)} %` : "–", "used"),
          num(fmtInt(s.pinned_chunks), "pinned_chunks"),
          num(`${fmtInt(s.compressed_chunks)} (${fmtBytes(s.compressed_bytes)})`, "compressed")));
      }
    }
  }
  fill("storage", ["instance", "worker", "location", "chunks", "tokens", "bytes", "capacity", "used",
    "pinned chunks", "compressed chunks (bytes)"], rows, "No worker reports its storage.");
}

function renderCommands(data) {
  const rows = data.recent_commands.map((c) => el("tr", { "data-event": c.event_id },
    num(fmtTime(c.time), "time"),
    el("td", { "data-field": "kind" }, c.kind + (c.method ? ` (${c.method})` : "")),
    el("td", { "data-field": "instance_id" }, el("code", {}, c.instance_id)),
    el("td", { "data-field": "location" }, c.location),
    statusCell(c.status, "status"),
    num(c.num_tokens, "num_tokens"),
    el("td", { "data-field": "workers" }, Object.entries(c.workers).map(([id, r]) =>
      `${id}: ${r.status}${r.num_tokens === undefined || r.num_tokens === null ? "" : ` ${r.num_tokens}`}` +
      (r.detail ? ` (${r.detail})` : "")).join(" · ")),
    el("td", {}, el("code", {}, c.event_id))));
  fill("commands", ["time", "kind", "instance", "location", "status", "num_tokens", "workers", "event id"], rows,
    "No command in the journal's newest entries.");
}

function renderAgentEvents(data) {
  const rows = data.agent_events.map((e) => el("tr", { "data-kind": e.kind },
    num(fmtTime(e.time), "time"),
    el("td", { "data-field": "kind" }, e.kind),
    el("td", { "data-field": "instance_id" }, el("code", {}, e.instance_id)),
    num(e.worker_id, "worker_id"),
    el("td", { "data-field": "detail" }, e.detail)));
  fill("agent-events", ["time", "event", "instance", "worker", "detail"], rows, "No agent event yet.");
}

function renderAnswered(data) {
  const rows = Object.entries(data.commands_answered).map(([kind, counts]) => el("tr", { "data-kind": kind },
    el("td", {}, kind), ...OUTCOMES.map((o) => num(counts[o] ?? 0, o))));
  fill("answered", ["kind", ...OUTCOMES], rows, "No command answered yet.");
}

function render(data) {
  renderSummary(data);
  renderInstances(data);
  renderWorkers(data);
  renderStorage(data);
  renderCommands(data);
  renderAgentEvents(data);
  renderAnswered(data);
  document.getElementById("controller-id").textContent = `served by controller ${data.controller_id}`;
}

function showConnection(error) {
  const line = document.getElementById("connection");
  document.body.classList.toggle("stale", Boolean(error));
  line.classList.toggle("down", Boolean(error));
  if (error) {
    const since = lastGood === null ? "never loaded" : `showing data from ${fmtTime(lastGood / 1000)}`;
    line.textContent = `cannot refresh (${error}); ${since}`;
  } else {
    line.textContent = `live, refreshed every ${(interval / 1000).toFixed(1)} s; last at ${fmtTime(lastGood / 1000)}`;
  }
}

async function refresh() {
  const started = performance.now();
  try {
    const response = await fetch("dashboard.json", { cache: "no-store", headers: authHeaders() });
    askForToken(response.status === 401);
    if (response.status === 401) {
      const sent = sessionStorage.getItem(TOKEN_KEY) !== null;
      throw new Error(sent ? "the API token given is not this controller's" : "token required");
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
    lastGood = Date.now();
    interval = Math.max(REFRESH_MS, SPACING_FACTOR * (performance.now() - started));
    document.body.dataset.refreshed = String(lastGood);
    showConnection(null);
  } catch (error) {
    showConnection(error.message || String(error));
  } finally {
    setTimeout(refresh, interval);
  }
}

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault(); // kept in the page: the token goes to sessionStorage, never into a URL
  const input = document.getElementById("token-input");
  sessionStorage.setItem(TOKEN_KEY, input.value.trim());
  input.value = "";
  askForToken(false);
});

takeTokenFromAddress();
refresh();
