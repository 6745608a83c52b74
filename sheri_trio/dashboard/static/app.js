// sheri dashboard: one page, no build step, nothing from the internet.
// State comes from /events (server-sent events): a snapshot, then batched updates.
"use strict";
const S = { agents: new Map(), tasks: new Map(), alerts: [], rates: new Map(), pending: {},
  writable: false, broker: null, selected: null, skew: 0, swarm: "" };
const MAX_TASKS = 5000, SHOWN_TASKS = 300, SHOWN_AGENTS = 300;
const $ = (id) => document.getElementById(id);
const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const now = () => Date.now() / 1000 + S.skew;
const ago = (t) => t == null ? "-" : `${Math.max(0, now() - t).toFixed(1)} s ago`;
const secs = (a, b) => (a == null || b == null) ? "-" : `${Math.max(0, b - a).toFixed(2)} s`;
const clock = (t) => t == null ? "-" : new Date(t * 1000).toLocaleTimeString();
const FINAL = new Set(["done", "failed", "cancelled", "expired"]);
// the chart's colours, read once (reading computed styles per frame forces a style pass)
const COLORS = Object.fromEntries(["line", "ok", "bad", "sub", "dim"].map((k) =>
  [k, getComputedStyle(document.documentElement).getPropertyValue(`--${k}`).trim()]));

function banner(kind, text) { const b = $("broker"); b.className = `banner ${kind}`; b.textContent = text; }
function setBroker(up) {
  S.broker = up;
  if (up) banner("ok", "broker connected"); else banner("down", "broker unreachable: reconnecting…");
}

function applySnapshot(s) {
  S.skew = s.now - Date.now() / 1000;
  S.swarm = s.swarm; $("swarm").textContent = s.swarm;
  S.agents = new Map(s.agents.map((a) => [a.agent_id, a]));
  S.tasks = new Map(); for (const t of s.tasks.slice().reverse()) S.tasks.set(t.task_id, t);
  S.alerts = s.alerts.slice();
  S.rates = new Map(s.rates.map((r) => [r[0], r.slice(1)]));
  S.pending = s.pending; S.writable = s.writable;
  const m = $("mode"); m.textContent = s.writable ? "token accepted: actions on" : "read-only (open the URL with ?token=)";
  m.className = s.writable ? "mode rw" : "mode";
  $("s-go").disabled = !s.writable;
  setBroker(s.broker); schedule(true);
}

function applyUpdate(u) {
  S.skew = u.now - Date.now() / 1000;
  for (const a of u.agents) S.agents.set(a.agent_id, a);
  for (const t of u.tasks) { S.tasks.delete(t.task_id); S.tasks.set(t.task_id, t); }
  while (S.tasks.size > MAX_TASKS) S.tasks.delete(S.tasks.keys().next().value);
  for (const a of u.alerts) S.alerts.push(a);
  if (S.alerts.length > 300) S.alerts.splice(0, S.alerts.length - 300);
  for (const r of u.rates) S.rates.set(r[0], r.slice(1));
  S.pending = u.pending;
  const changedSel = S.selected && u.tasks.some((t) => t.task_id === S.selected);
  schedule(changedSel, [...(u.agents.length ? ["agents"] : []), ...(u.tasks.length ? ["tasks"] : [])]);
}

let queued = false, detailToo = false;
const dirty = { agents: true, tasks: true };
function schedule(detail, what) {
  detailToo = detailToo || !!detail;
  if (what) for (const k of what) dirty[k] = true; else { dirty.agents = dirty.tasks = true; }
  if (queued) return; queued = true;
  requestAnimationFrame(() => { queued = false; render(); if (detailToo) { detailToo = false; loadDetail(); } });
}

function render() {   // the chart first: drawn after the tables, it would wait for their layout
  renderChart(); renderCounts(); renderAlerts();
  if (dirty.agents) renderAgents();
  if (dirty.tasks) renderTasks();
  dirty.agents = dirty.tasks = false;
}

function renderAgents() {
  const cmp = (x, y) => (x < y ? -1 : x > y ? 1 : 0);
  const rows = [...S.agents.values()].sort((a, b) =>
    (a.status !== "online") - (b.status !== "online") || cmp(a.role || "", b.role || "") || cmp(a.agent_id, b.agent_id));
  const shown = rows.slice(0, SHOWN_AGENTS);
  $("agents").tBodies[0].innerHTML = shown.map((a) => `<tr data-agent="${esc(a.agent_id)}">
    <td>${esc(a.agent_id)}</td><td>${esc(a.role || "?")}</td>
    <td class="st-${esc(a.status)}">${esc(a.status)}${a.reason ? ` <span class="dim">(${esc(a.reason)})</span>` : ""}</td>
    <td>${a.status === "online" ? ago(a.last_seen) : "-"}</td><td>${a.running ?? "-"}</td>
    <td>${a.queued ?? "-"}</td><td>${a.capacity ?? "-"}</td></tr>`).join("");
  const online = rows.filter((a) => a.status === "online").length;
  $("agents-count").textContent = `${online} online of ${rows.length}` + (rows.length > shown.length ? ` (first ${shown.length} shown)` : "");
}

function options(select, values, label) {
  const cur = select.value, have = [...select.options].map((o) => o.value).slice(1).join("\n");
  const want = [...values].sort();
  if (have === want.join("\n")) return;
  select.innerHTML = `<option value="">${label}</option>` + want.map((v) => `<option>${esc(v)}</option>`).join("");
  select.value = cur;
}

function renderTasks() {
  const all = [...S.tasks.values()];
  options($("f-state"), new Set(all.map((t) => t.state)), "any state");
  options($("f-type"), new Set(all.map((t) => t.type).filter(Boolean)), "any type");
  options($("f-role"), new Set(all.map((t) => t.role).filter(Boolean)), "any role");
  const st = $("f-state").value, ty = $("f-type").value, ro = $("f-role").value, tx = $("f-text").value.trim().toLowerCase();
  const out = [];
  for (let i = all.length - 1; i >= 0 && out.length < SHOWN_TASKS; i--) {
    const t = all[i];
    if (st && t.state !== st) continue; if (ty && t.type !== ty) continue; if (ro && t.role !== ro) continue;
    if (tx && !`${t.task_id} ${t.agent || ""} ${t.error || ""} ${t.type || ""}`.toLowerCase().includes(tx)) continue;
    out.push(t);
  }
  $("tasks").tBodies[0].innerHTML = out.map((t) => {
    const ran = t.duration_ms != null ? `${(t.duration_ms / 1000).toFixed(2)} s` : (t.started != null && !FINAL.has(t.state) ? `${Math.max(0, now() - t.started).toFixed(1)} s…` : "-");
    return `<tr data-task="${esc(t.task_id)}" class="${t.task_id === S.selected ? "sel" : ""}">
    <td>${esc(t.task_id)}</td><td>${esc(t.type || "?")}</td><td class="state st-${esc(t.state)}">${esc(t.state)}</td>
    <td>${esc(t.agent || "-")}</td><td>${t.attempt || "-"}</td><td>${secs(t.submitted, t.started)}</td><td>${ran}</td>
    <td>${clock(t.finished)}</td></tr>`;
  }).join("");
  $("tasks-count").textContent = `${out.length} shown of ${S.tasks.size}`;
}

function renderAlerts() {
  $("alerts").innerHTML = S.alerts.slice(-100).reverse().map((a) =>
    `<li><time>${clock(a.at)}</time><span class="kind ${esc(a.kind)}">${esc(a.kind)}</span>${esc(a.message)}</li>`).join("")
    || `<li class="dim">none</li>`;
}

function renderCounts() {
  const by = {}; for (const t of S.tasks.values()) by[t.state] = (by[t.state] || 0) + 1;
  $("counts").textContent = Object.entries(by).sort().map(([k, v]) => `${k} ${v}`).join(" · ");
  const p = Object.entries(S.pending || {}).filter(([, v]) => v > 0).map(([k, v]) => `${k} ${v}`);
  $("pending").textContent = "pending: " + (p.join(", ") || "none");
}

let chartSize = null;
window.addEventListener("resize", () => { chartSize = null; schedule(false, []); });
function renderChart() {
  const c = $("chart"), dpr = window.devicePixelRatio || 1;
  if (!chartSize) chartSize = [c.clientWidth || 560, c.clientHeight || 150];   // read once: a read forces layout
  const [W, H] = chartSize;
  if (c.width !== W * dpr) { c.width = W * dpr; c.height = H * dpr; }
  const g = c.getContext("2d"); g.setTransform(dpr, 0, 0, dpr, 0, 0); g.clearRect(0, 0, W, H);
  const end = Math.floor(now()), n = 120, series = [];
  let max = 1;
  for (let s = end - n + 1; s <= end; s++) { const r = S.rates.get(s) || [0, 0, 0]; series.push(r); max = Math.max(max, r[0], r[1] + r[2]); }
  const bw = W / n;
  g.strokeStyle = COLORS.line; g.beginPath();
  for (let i = 1; i < 4; i++) { g.moveTo(0, H - (H - 14) * i / 4); g.lineTo(W, H - (H - 14) * i / 4); } g.stroke();
  series.forEach((r, i) => {   // stacked bars: completed, then failed
    const x = i * bw, hOk = (H - 14) * r[1] / max, hBad = (H - 14) * r[2] / max;
    g.fillStyle = COLORS.ok; g.fillRect(x, H - hOk, Math.max(bw - 0.5, 0.5), hOk);
    g.fillStyle = COLORS.bad; g.fillRect(x, H - hOk - hBad, Math.max(bw - 0.5, 0.5), hBad);
  });
  g.strokeStyle = COLORS.sub; g.beginPath();   // submitted, a line
  series.forEach((r, i) => { const y = H - (H - 14) * r[0] / max; if (i) g.lineTo(i * bw + bw / 2, y); else g.moveTo(bw / 2, y); });
  g.stroke();
  g.fillStyle = COLORS.dim; g.fillText(`${max}/s`, 4, 11);
  const last = series.slice(-10), sum = (k) => last.reduce((a, r) => a + r[k], 0) / 10;
  $("rate-now").textContent = `last 10 s: ${sum(0).toFixed(1)} submitted/s, ${sum(1).toFixed(1)} completed/s, ${sum(2).toFixed(1)} failed/s`;
}

async function loadDetail() {
  const id = S.selected; if (!id) return;
  const r = await fetch(`/api/tasks/${encodeURIComponent(id)}`);
  if (id !== S.selected) return;
  if (!r.ok) { $("detail").textContent = (await r.json()).error; return; }
  const t = await r.json();
  $("detail-id").textContent = t.task_id;
  const final = FINAL.has(t.state);
  $("cancel").disabled = !S.writable || final;
  $("retry").disabled = !S.writable || !final || t.state === "done";
  const ev = t.events.map((e) => `<li><time>${clock(e.at)}</time>${esc(e.state || "")} <span class="dim">${esc(e.event || "")}
    attempt ${e.attempt} try ${e.try ?? "-"} ${esc(e.agent_id || "")}</span> ${esc(e.message || "")} ${e.error ? `<span class="st-failed">${esc(e.error)}</span>` : ""}
    ${e.delay != null ? `<span class="dim">retry in ${esc(e.delay)} s</span>` : ""}</li>`).join("");
  const chain = t.retry_chain.map((c) => `${esc(c.task_id)} (<span class="st-${esc(c.state)}">${esc(c.state)}</span>)`).join(", ");
  $("detail").innerHTML = `<dl>
    <dt>state</dt><dd class="st-${esc(t.state)}" id="detail-state">${esc(t.state)}${t.reason ? ` (${esc(t.reason)})` : ""}</dd>
    <dt>type</dt><dd>${esc(t.type || "?")}</dd><dt>agent</dt><dd>${esc(t.agent || "-")} ${t.role ? `(${esc(t.role)})` : ""}</dd>
    <dt>attempt</dt><dd>${t.attempt}, ${t.retries} retr${t.retries === 1 ? "y" : "ies"} after failed tries</dd>
    <dt>times</dt><dd>seen ${clock(t.submitted)}, claimed ${clock(t.started)}, running ${clock(t.running_since)}, finished ${clock(t.finished)}${t.duration_ms != null ? `, ${t.duration_ms} ms` : ""}</dd>
    ${t.retry_of ? `<dt>retry of</dt><dd>${esc(t.retry_of)}</dd>` : ""}${chain ? `<dt>retries</dt><dd>${chain}</dd>` : ""}
    </dl>${t.error ? `<h2>error</h2><pre class="st-failed">${esc(t.error)}</pre>` : ""}
    ${t.result != null ? `<h2>result</h2><pre>${esc(JSON.stringify(t.result, null, 1))}</pre>` : ""}
    <h2>events</h2><ul class="events">${ev || "<li class=dim>none seen</li>"}</ul>
    ${t.submission ? `<h2>submission</h2><pre>${esc(JSON.stringify(t.submission))}</pre>` : ""}`;
}

function say(el, ok, text) { el.className = ok ? "msg-ok" : "msg-bad"; el.textContent = text; }
async function post(url, body) {
  const r = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body || {}), credentials: "same-origin" });
  let data = {}; try { data = await r.json(); } catch (e) { data = { error: `HTTP ${r.status}` }; }
  return [r.ok, data];
}

$("tasks").addEventListener("click", (e) => {
  const tr = e.target.closest("tr[data-task]"); if (!tr) return;
  S.selected = tr.dataset.task; $("action-msg").textContent = ""; schedule(true);
});
for (const id of ["f-state", "f-type", "f-role", "f-text"]) $(id).addEventListener("input", () => schedule(false, ["tasks"]));
$("cancel").addEventListener("click", async () => {
  const [ok, d] = await post(`/api/tasks/${encodeURIComponent(S.selected)}/cancel`);
  say($("action-msg"), ok, ok ? `cancel of ${d.task_id} requested` : d.error);
});
$("retry").addEventListener("click", async () => {
  const [ok, d] = await post(`/api/tasks/${encodeURIComponent(S.selected)}/retry`);
  say($("action-msg"), ok, ok ? `submitted ${d.task_id} (retry of ${d.retry_of})` : d.error);
});
$("submit-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const f = new FormData(e.target), body = Object.fromEntries(f.entries());
  const [ok, d] = await post("/api/tasks", body);
  say($("submit-msg"), ok, ok ? `submitted ${d.task_id}` : d.error);
});
$("types").innerHTML = ["code.review", "code.generate", "deployment.deploy", "deployment.rollback", "testing.run",
  "testing.coverage", "security.scan", "security.audit", "monitoring.health", "monitoring.alerts",
  "documentation.generate", "database.migrate", "database.backup"].map((t) => `<option>${t}</option>`).join("");

function connect() {
  const es = new EventSource("/events");
  es.addEventListener("snapshot", (e) => applySnapshot(JSON.parse(e.data)));
  es.addEventListener("update", (e) => applyUpdate(JSON.parse(e.data)));
  es.addEventListener("broker", (e) => { setBroker(JSON.parse(e.data).connected); });
  es.onerror = () => { if (es.readyState !== EventSource.OPEN) banner("down", "dashboard unreachable: reconnecting…"); };
}
connect();
setInterval(() => schedule(false, ["agents", "tasks"]), 1000);   // heartbeat ages and the chart move on
