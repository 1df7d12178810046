// microbatch's live page: polls /dashboard/data once a second, draws with uPlot (served
// by this server), and changes the batching settings through PATCH /admin/batching.
// With several models served, a picker shows one model's panel at a time (?model=NAME).
"use strict";

const REASONS = ["idle", "full", "tokens", "window", "drain"];
const COLORS = {
  blue: "#2f6fdf", red: "#d6453d", green: "#2e9b52", orange: "#e08a1e",
  purple: "#8a4fd8", grey: "#7a828c", teal: "#1f9aa5",
};
const REASON_COLORS = [COLORS.green, COLORS.blue, COLORS.purple, COLORS.orange, COLORS.grey];

const state = {
  samples: [],      // every sample received, oldest first (the server keeps ten minutes)
  events: [],
  batching: null,
  last: 0,          // Unix time of the newest sample
  rangeS: 300,
  charts: {},
  polls: 0,
  errors: 0,
  model: new URLSearchParams(location.search).get("model") || "",  // "" = the default
};
window.dashboard = state;  // for people (and tests) poking at the page

const $ = (id) => document.getElementById(id);
const fmt = (v, digits = 1) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));

function series(label, stroke, extra = {}) {
  return { label, stroke, width: 1.5, spanGaps: false, ...extra };
}

function timeChart(id, lines, axes) {
  const el = $(id);
  const opts = {
    width: el.clientWidth || 400,
    height: 180,
    scales: { x: { time: true } },
    series: [{}, ...lines],
    axes: axes || [{}, { size: 50 }],
    legend: { live: true },
    cursor: { drag: { x: false, y: false } },
  };
  const chart = new uPlot(opts, [[], ...lines.map(() => [])], el);
  state.charts[id] = chart;
  return chart;
}

function makeCharts() {
  timeChart("chart-throughput", [
    series("items/s", COLORS.blue), series("429/s", COLORS.red),
  ]);
  timeChart("chart-latency", [
    series("p50", COLORS.green), series("p99", COLORS.orange),
    series("SLO target", COLORS.red, { dash: [6, 4] }),
    series("SLO window p99", COLORS.purple, { dash: [2, 3] }),
  ]);
  timeChart("chart-queue", [
    series("queued", COLORS.blue), series("oldest age ms", COLORS.orange, { scale: "ms" }),
  ], [{}, { size: 50 }, { scale: "ms", side: 1, size: 50, grid: { show: false } }]);
  timeChart("chart-batch", [
    series("mean batch", COLORS.blue), series("max_batch_size", COLORS.grey, { dash: [6, 4] }),
    series("max_wait_ms", COLORS.orange, { scale: "ms" }),
  ], [{}, { size: 50 }, { scale: "ms", side: 1, size: 50, grid: { show: false } }]);
  timeChart("chart-reasons", REASONS.map((r, i) => series(r, REASON_COLORS[i])));
  timeChart("chart-padding", [
    series("padding ratio", COLORS.purple), series("busy fraction", COLORS.teal, { scale: "frac" }),
  ], [{}, { size: 50 }, { scale: "frac", side: 1, size: 50, grid: { show: false } }]);
  const el = $("chart-sizes");
  state.charts["chart-sizes"] = new uPlot({
    width: el.clientWidth || 400,
    height: 180,
    scales: { x: { time: false, range: (u, lo, hi) => [Math.max(0, lo - 1), hi + 1] } },
    series: [{ label: "size" }, {
      label: "batches", stroke: COLORS.blue, fill: "rgba(47,111,223,0.35)",
      paths: uPlot.paths.bars({ size: [0.7, 40] }), points: { show: false },
    }],
    axes: [{ label: "items in the batch", incrs: [1, 2, 4, 8, 16, 32, 64, 128] }, { size: 50 }],
  }, [[], []], el);
}

function visible() {
  const from = state.last - state.rangeS;
  return state.samples.filter((s) => s.t > from);
}

function draw() {
  const rows = visible();
  const col = (f) => rows.map(f);
  const t = col((s) => s.t);
  const c = state.charts;
  c["chart-throughput"].setData([t, col((s) => s.items_per_s), col((s) => s.rejected_per_s)]);
  c["chart-latency"].setData([t, col((s) => s.p50_ms), col((s) => s.p99_ms),
    col((s) => s.slo_p99_ms), col((s) => s.slo_window_p99_ms)]);
  c["chart-queue"].setData([t, col((s) => s.queue_depth), col((s) => s.oldest_age_ms)]);
  c["chart-batch"].setData([t, col((s) => s.mean_batch_size), col((s) => s.max_batch_size),
    col((s) => s.max_wait_ms)]);
  c["chart-reasons"].setData([t, ...REASONS.map((r) => col((s) => s.batches[r] || 0))]);
  c["chart-padding"].setData([t, col((s) => s.padding_ratio), col((s) => s.busy_fraction)]);
  const sizes = new Map();
  for (const s of rows) {
    for (const [size, n] of Object.entries(s.batch_sizes)) {
      sizes.set(Number(size), (sizes.get(Number(size)) || 0) + n);
    }
  }
  const xs = [...sizes.keys()].sort((a, b) => a - b);
  c["chart-sizes"].setData([xs, xs.map((x) => sizes.get(x))]);

  const now = rows[rows.length - 1];
  if (now) {
    $("kpi-items").textContent = fmt(now.items_per_s);
    $("kpi-p50").textContent = fmt(now.p50_ms);
    $("kpi-p99").textContent = fmt(now.p99_ms);
    $("kpi-queue").textContent = now.queue_depth;
    $("kpi-batch").textContent = fmt(now.mean_batch_size);
    $("kpi-busy").textContent = `${fmt(100 * now.busy_fraction, 0)} %`;
    $("kpi-rejected").textContent = fmt(now.rejected_per_s);
  }
  document.body.dataset.samples = String(state.samples.length);
}

function showEvents() {
  const list = $("events");
  list.replaceChildren(...state.events.slice().reverse().map((e) => {
    const li = document.createElement("li");
    const time = document.createElement("time");
    time.textContent = new Date(e.t * 1000).toLocaleTimeString();
    li.append(time, e.text);
    return li;
  }));
}

// With an SLO target, the form shows (and sets) the configured limits the controller
// moves within, not the controller's current choice.
const asSet = (batching) => ({ ...batching, ...(batching.configured || {}) });

function showSettings(batching) {
  state.batching = batching;
  const form = $("batching");
  if (form.contains(document.activeElement) || form.dataset.dirty === "1") return;
  const set = asSet(batching);
  for (const name of ["max_batch_size", "max_wait_ms", "max_queue_size", "policy"]) {
    form.elements[name].value = set[name];
  }
  form.elements.slo_p99_ms.value = batching.slo_p99_ms ?? "";
  const slo = batching.slo;
  $("slo-state").textContent = slo
    ? `SLO step ${slo.step} of ${slo.steps - 1}` +
      (batching.configured ? ` within max_batch_size ${batching.configured.max_batch_size}, ` +
        `max_wait_ms ${batching.configured.max_wait_ms}` : "") +
      (slo.last_window ? `; last window p99 ${fmt(slo.last_window.p99_ms)} ms` : "")
    : "No SLO target: the limits stay as set.";
}

async function poll() {
  try {
    const which = state.model ? `&model=${encodeURIComponent(state.model)}` : "";
    const reply = await fetch(`/dashboard/data?since=${state.last}${which}`, { cache: "no-store" });
    if (!reply.ok) throw new Error(`HTTP ${reply.status}`);
    const data = await reply.json();
    state.polls += 1;
    if (data.samples.length) {
      state.samples.push(...data.samples);
      state.last = data.samples[data.samples.length - 1].t;
      const keep = state.last - data.history_s;
      while (state.samples.length && state.samples[0].t <= keep) state.samples.shift();
    }
    if (data.events.length) {
      state.events.push(...data.events);
      showEvents();
    }
    $("model").textContent = `${data.model} · ${data.device} · ${data.dtype}`;
    showModels(data.models, data.model);
    const status = $("status");
    status.textContent = data.status;
    status.className = `pill ${data.status}`;
    showSettings(data.batching);
    showVersions(data);
    showTenants(data.tenants || []);
    draw();
  } catch (err) {
    state.errors += 1;
    const status = $("status");
    status.textContent = "offline";
    status.className = "pill offline";
  } finally {
    setTimeout(poll, 1000);
  }
}

async function apply(event) {
  event.preventDefault();
  const form = event.target;
  const out = $("form-status");
  const current = asSet(state.batching || {});
  const body = {};
  for (const name of ["max_batch_size", "max_wait_ms", "max_queue_size"]) {
    const v = Number(form.elements[name].value);
    if (form.elements[name].value !== "" && v !== current[name]) body[name] = v;
  }
  if (form.elements.policy.value !== current.policy) body.policy = form.elements.policy.value;
  const slo = form.elements.slo_p99_ms.value;
  const target = slo === "" ? null : Number(slo);
  if (target !== (current.slo_p99_ms ?? null)) body.slo_p99_ms = target;
  if (!Object.keys(body).length) {
    out.textContent = "nothing to change";
    out.className = "";
    return;
  }
  const key = form.elements.admin_key.value;
  if (key) sessionStorage.setItem("microbatch-admin-key", key);
  const headers = { "content-type": "application/json" };
  if (key) headers.authorization = `Bearer ${key}`;
  out.textContent = "applying…";
  out.className = "";
  try {
    const which = state.model ? `?model=${encodeURIComponent(state.model)}` : "";
    const reply = await fetch(`/admin/batching${which}`, {
      method: "PATCH", headers, body: JSON.stringify(body),
    });
    const data = await reply.json();
    if (!reply.ok) {
      const detail = Array.isArray(data.detail)
        ? data.detail.map((d) => d.msg).join("; ")
        : (data.detail || data.message || JSON.stringify(data));
      throw new Error(`${reply.status}: ${detail}`);
    }
    form.dataset.dirty = "0";
    out.textContent = "applied: " + Object.entries(body).map(([k, v]) => `${k} ${v}`).join(", ");
    out.className = "ok";
    document.activeElement.blur();
    showSettings(data);
  } catch (err) {
    out.textContent = `refused: ${err.message}`;
    out.className = "error";
  }
}

const pct = (x) => (x == null ? "–" : `${(100 * x).toFixed(1)} %`);
const num = (x, digits = 4) => (x == null ? "–" : x.toFixed(digits));

function item(text) {
  const li = document.createElement("li");
  li.textContent = text;
  return li;
}

// The shown model's versions: their state and share of its traffic, how each shadow
// agrees with the version it shadows, and each version's drift.
function showVersions(data) {
  const versions = data.versions || [];
  const drift = Object.values(data.drift || {});
  $("versions-panel").hidden = versions.length < 2 && !data.shadows.length && !drift.length;
  $("versions").tBodies[0].replaceChildren(...versions.map((v) => {
    const row = document.createElement("tr");
    for (const text of [v.version, v.status, pct(v.traffic), v.shadow ? pct(v.shadow) : "–"]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    return row;
  }));
  $("shadows").replaceChildren(...data.shadows.map((s) => {
    const measures = [
      s.cosine != null ? `cosine ${num(s.cosine)}` : null,
      s.label_agreement != null ? `same label ${pct(s.label_agreement)}` : null,
      s.rank_correlation != null ? `rank correlation ${num(s.rank_correlation, 3)}` : null,
      s.score_difference != null ? `|Δscore| ${num(s.score_difference)}` : null,
    ].filter(Boolean);
    return item(`${s.shadow} vs ${s.primary}: ${measures.join(", ")} over ${s.items} inputs`);
  }));
  $("drift").replaceChildren(...drift.map((d) => {
    const ref = d.reference;
    const now = d.recent;
    if (!ref) return item(`${d.version}: collecting its reference`);
    if (d.task === "classify") return item(`${d.version}: PSI ${num(now.psi, 3)}`);
    if (d.task === "embed") {
      return item(`${d.version}: centroid cosine ${num(now.centroid_cosine)} ` +
        `(reference ${num(ref.centroid_cosine)})`);
    }
    const q = (xs) => (xs ? xs.map((x) => num(x, 3)).join(" / ") : "–");
    return item(`${d.version}: score p10/p50/p90 ${q(now.score_quantiles)} ` +
      `(reference ${q(ref.score_quantiles)})`);
  }));
}

// Each tenant's use since the start: requests, inputs, refusals (429 and 403), and its
// share of the device time.
function showTenants(tenants) {
  $("tenants-panel").hidden = !tenants.length;
  $("tenants").tBodies[0].replaceChildren(...tenants.map((t) => {
    const row = document.createElement("tr");
    for (const text of [t.tenant, t.requests, t.items, t.rejected, pct(t.device_share)]) {
      const cell = document.createElement("td");
      cell.textContent = String(text);
      row.append(cell);
    }
    return row;
  }));
}

function showModels(models, shown) {
  const pick = $("model-pick");
  $("model-pick-label").hidden = models.length < 2;
  if (pick.options.length !== models.length) {
    pick.replaceChildren(...models.map((name) => new Option(name, name)));
  }
  pick.value = shown;
}

function switchModel(name) {
  state.model = name;
  state.samples = [];
  state.events = [];
  state.last = 0;
  const url = new URL(location.href);
  url.searchParams.set("model", name);
  history.replaceState(null, "", url);
  $("batching").dataset.dirty = "0";
}

function resize() {
  for (const [id, chart] of Object.entries(state.charts)) {
    chart.setSize({ width: $(id).clientWidth, height: 180 });
  }
}

makeCharts();
const form = $("batching");
form.elements.admin_key.value = sessionStorage.getItem("microbatch-admin-key") || "";
form.addEventListener("input", () => { form.dataset.dirty = "1"; });
form.addEventListener("submit", apply);
$("range").addEventListener("change", (e) => { state.rangeS = Number(e.target.value); draw(); });
$("model-pick").addEventListener("change", (e) => switchModel(e.target.value));
window.addEventListener("resize", resize);
poll();
