// qfine studio: one page, hash routes (#/runs, #/run/NAME, #/compare/A,B, #/launch, #/chat/NAME).
"use strict";
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
let META = null, LIVE = null, RUNS = [], SORT = {key: "started", dir: -1};
// runs ticked for comparison: kept across the table's periodic re-render
const PICKED = new Set();
let RUNS_HTML = "";

async function api(path, body, raw) {
  const opts = body === undefined ? {} : {method: "POST", body: raw ? body : JSON.stringify(body),
    headers: {"content-type": raw ? "application/octet-stream" : "application/json"}};
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({error: `${r.status} ${r.statusText}`}));
  if (!r.ok) throw new Error(data.error || `${r.status}`);
  return data;
}

// ---- charts -------------------------------------------------------------------------------------
// One chart per group; a group's series share the step axis, with gaps where a row lacks a value.
const GROUPS = [["loss", ["loss", "eval_loss"]], ["learning rate", ["lr"]], ["grad norm", ["grad_norm"]],
  ["tokens/s", ["tokens_per_s"]], ["GPU memory (GiB)", ["peak_gpu_mem_gib"]]];
const SKIP = new Set(["step", "epoch", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second",
  "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "eval_perplexity"]);
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];

function groupsFor(rows) {
  const keys = new Set();
  rows.forEach((r) => Object.keys(r).forEach((k) => { if (typeof r[k] === "number" && !SKIP.has(k)) keys.add(k); }));
  const known = new Set(GROUPS.flatMap(([, ks]) => ks));
  const out = GROUPS.map(([t, ks]) => [t, ks.filter((k) => keys.has(k))]).filter(([, ks]) => ks.length);
  [...keys].filter((k) => !known.has(k)).sort().forEach((k) => out.push([k, [k]]));
  return out;
}

class Chart {
  constructor(parent, title, labels, id) {
    this.labels = labels; this.el = document.createElement("div"); this.el.className = "chart";
    this.el.id = id; this.el.innerHTML = `<h4>${esc(title)}</h4>`; parent.appendChild(this.el);
    const series = [{label: "step"}, ...labels.map((l, i) => ({label: l, stroke: COLORS[i % COLORS.length],
      width: 1.5, spanGaps: true, points: {show: l.startsWith("eval") || l.includes(":eval")}}))];
    // small values (learning rates) in exponent form: uPlot's default rounds 2e-4 to 0
    const tick = (u, vals) => vals.map((v) => (v == null ? "" : v !== 0 && Math.abs(v) < 0.01 ? v.toExponential(1) : +v.toPrecision(4)));
    this.plot = new uPlot({width: 420, height: 200, series, scales: {x: {time: false}}, axes: [{}, {values: tick, size: 60}]},
      [[], ...labels.map(() => [])], this.el);
    this.setPoints(0);
  }
  setPoints(n) { this.el.dataset.points = n; }
  setData(data) {
    this.plot.setData(data);
    this.setPoints(data[0].length);
  }
}

// The live charts of one run: rows arrive from server-sent events and are appended.
class RunCharts {
  constructor(parent) { this.parent = parent; this.rows = []; this.charts = new Map(); parent.innerHTML = ""; }
  add(rows, reset) {
    if (reset) { this.rows = []; }
    this.rows.push(...rows);
    const groups = groupsFor(this.rows);
    for (const [title, keys] of groups) {
      const name = title + "|" + keys.join(",");
      if (!this.charts.has(name)) {
        [...this.charts.entries()].filter(([n]) => n.startsWith(title + "|")).forEach(([n, c]) => { c.el.remove(); this.charts.delete(n); });
        this.charts.set(name, new Chart(this.parent, title, keys, "chart-" + title.replace(/[^a-z0-9]+/gi, "-")));
      }
      const use = this.rows.filter((r) => keys.some((k) => typeof r[k] === "number"));
      this.charts.get(name).setData([use.map((r) => r.step), ...keys.map((k) => use.map((r) => (typeof r[k] === "number" ? r[k] : null)))]);
    }
  }
}

// ---- pages --------------------------------------------------------------------------------------
function show(page) {
  document.querySelectorAll(".page").forEach((p) => p.classList.toggle("shown", p.id === "page-" + page));
  document.querySelectorAll("header nav a").forEach((a) => a.classList.toggle("active", a.id === "nav-" + page));
}

function fmtSeconds(s) {
  if (s == null) return "";
  s = Math.round(s); const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${r}s` : `${r}s`;
}

function renderRuns() {
  const q = $("runs-filter").value.toLowerCase();
  const cell = (r, k) => (k === "best" ? (r.best ? r.best.value : null) : r[k]);
  const rows = RUNS.filter((r) => !q || [r.name, r.model, r.objective, r.state].join(" ").toLowerCase().includes(q))
    .sort((a, b) => { const x = cell(a, SORT.key), y = cell(b, SORT.key); return (x > y ? 1 : x < y ? -1 : 0) * SORT.dir; });
  const names = new Set(RUNS.map((r) => r.name));
  [...PICKED].filter((n) => !names.has(n)).forEach((n) => PICKED.delete(n));
  const html = rows.map((r) => `<tr data-run="${esc(r.name)}">
    <td><input type="checkbox" class="pick" value="${esc(r.name)}"></td>
    <td><a href="#/run/${encodeURIComponent(r.name)}">${esc(r.name)}</a></td>
    <td><span class="state ${esc(r.state)}" title="${esc(r.detail)}">${esc(r.state)}</span></td>
    <td>${esc(r.model)}</td><td>${esc(r.objective)}</td>
    <td>${r.steps}${r.planned > 0 ? " / " + r.planned : ""}</td>
    <td>${r.best ? esc(r.best.metric) + " " + Number(r.best.value).toPrecision(4) : ""}</td>
    <td>${fmtSeconds(r.seconds)}</td><td>${r.started ? new Date(r.started * 1000).toLocaleString() : ""}</td></tr>`).join("");
  $("runs-count").textContent = `${rows.length} of ${RUNS.length} runs`;
  $("btn-compare").disabled = PICKED.size < 2;
  // an unchanged table is left alone, so a row being read or clicked is not replaced under the pointer
  if (html === RUNS_HTML) return;
  RUNS_HTML = html;
  $("runs-table").tBodies[0].innerHTML = html;
  document.querySelectorAll(".pick").forEach((c) => {
    c.checked = PICKED.has(c.value);
    c.addEventListener("change", () => {
      if (c.checked) PICKED.add(c.value); else PICKED.delete(c.value);
      $("btn-compare").disabled = PICKED.size < 2; });
  });
}

async function pageRuns() {
  show("runs");
  const data = await api("/api/runs");
  RUNS = data.runs; renderRuns();
  document.body.dataset.loaded = "runs";
}

function closeLive() { if (LIVE) { LIVE.close(); LIVE = null; } }

async function pageRun(name) {
  show("run");
  $("run-name").textContent = name;
  $("run-chat").href = "#/chat/" + encodeURIComponent(name);
  $("run-report").href = `/api/runs/${encodeURIComponent(name)}/report`;
  $("run-preview").textContent = "";
  const charts = new RunCharts($("charts"));
  await refreshRun(name);
  LIVE = new EventSource(`/api/runs/${encodeURIComponent(name)}/events`);
  LIVE.addEventListener("rows", (e) => { const d = JSON.parse(e.data); charts.add(d.rows, d.reset);
    const last = charts.rows.filter((r) => "loss" in r).pop();
    $("run-steps").textContent = last ? `step ${last.step} · loss ${last.loss.toFixed(4)}` : ""; });
  let last = "";
  LIVE.addEventListener("state", (e) => { const d = JSON.parse(e.data); setState(d.state, d.detail); renderJobs(d.jobs);
    const sig = d.state + "|" + (d.jobs || []).map((j) => j.state).join(",");
    if (sig !== last) { last = sig; refreshRun(name); } });  // a log line alone redraws only the jobs
  document.body.dataset.loaded = "run";
}

function setState(state, detail) {
  const el = $("run-state"); el.textContent = state; el.className = "state " + state; el.title = detail || "";
  $("btn-stop").disabled = state !== "running";
  $("btn-resume").disabled = !["stopped", "killed", "failed"].includes(state);
}

async function refreshRun(name) {
  const d = await api(`/api/runs/${encodeURIComponent(name)}`);
  setState(d.state, d.detail);
  $("run-detail").textContent = `${d.model} · ${d.objective} · ${d.detail || ""}` +
    (d.checkpoints.length ? ` · checkpoints: ${d.checkpoints.join(", ")}` : "");
  $("run-config").textContent = d.config;
  $("run-data").textContent = d.data ? JSON.stringify(d.data, null, 1) : "(written when training starts)";
  $("btn-export").disabled = $("btn-merge").disabled = !d.adapter;
  $("exports").innerHTML = d.exports.map((x) => `<div class="job export" data-name="${esc(x.name)}"><b>${esc(x.name)}</b>
    ${(x.bytes / 2 ** 20).toFixed(1)} MiB${x.report ? reportHtml(x.report) : ""}</div>`).join("");
  renderJobs(d.jobs);
  return d;
}

// A GGUF export's report (qfine.export.gguf_file.ExportReport, tensors summarised by the server).
function reportHtml(r) {
  const num = (v, d) => (typeof v === "number" ? v.toExponential(d) : "");
  const rows = [
    ["type", r.quant], ["architecture", r.arch], ["written in", typeof r.seconds === "number" ? r.seconds.toFixed(1) + " s" : ""],
    ["tensors", Object.entries(r.tensor_types || {}).map(([t, n]) => `${n} × ${t}`).join(", ")],
    ["worst tensor", r.worst_tensor ? `${r.worst_tensor.name}: ${num(r.worst_tensor.rel_error, 2)} relative L2` : ""],
    ["logits vs the merged model", Object.entries(r.logits || {}).map(([p, e]) => `“${p}” ${num(e, 2)}`).join("; ")],
    ["importance matrix", r.imatrix || "none"],
    ["llama.cpp's scores", r.verify && Object.keys(r.verify).length ? JSON.stringify(r.verify) : "not asked for (qfine export --verify)"],
    ["Ollama Modelfile", r.modelfile], ["note", r.note]];
  return `<table class="export-report" data-quant="${esc(r.quant)}">` +
    rows.filter(([, v]) => v).map(([k, v]) => `<tr><th>${esc(k)}</th><td>${esc(v)}</td></tr>`).join("") + "</table>";
}

function renderJobs(jobs) {
  $("jobs").innerHTML = (jobs || []).map((j) => `<div class="job" data-kind="${esc(j.kind)}" data-state="${esc(j.state)}">
    <b>${esc(j.kind)}</b> ${esc(j.out)} — ${esc(j.state)}<pre>${esc(j.log.split("\n").slice(-12).join("\n"))}</pre></div>`).join("");
}

async function pageCompare(names) {
  show("compare");
  $("compare-runs").textContent = names.join(" vs ");
  const parent = $("compare-charts"); parent.innerHTML = "";
  const all = await Promise.all(names.map((n) => api(`/api/runs/${encodeURIComponent(n)}/metrics`)));
  for (const key of ["loss", "eval_loss", "lr", "grad_norm", "tokens_per_s"]) {
    const per = all.map((d) => d.rows.filter((r) => typeof r[key] === "number"));
    if (!per.some((p) => p.length)) continue;
    const steps = [...new Set(per.flatMap((p) => p.map((r) => r.step)))].sort((a, b) => a - b);
    const chart = new Chart(parent, key, names.map((n) => `${n}:${key}`), "compare-" + key);
    chart.setData([steps, ...per.map((p) => { const m = new Map(p.map((r) => [r.step, r[key]])); return steps.map((s) => m.get(s) ?? null); })]);
  }
  document.body.dataset.loaded = "compare";
}

// ---- launch -------------------------------------------------------------------------------------
const FORM = ["model.source", "data.path", "data.eval_path", "train.objective", "model.quantization", "lora.r",
  "lora.alpha", "lora.dropout", "train.max_steps", "train.learning_rate", "train.batch_size", "data.max_seq_len",
  "train.save_steps", "train.eval_steps"];

function formFields() {
  const out = {};
  for (const key of FORM) { const v = $("f-" + key).value; if (v !== "") out[key] = v; }
  for (const line of $("f-extra").value.split("\n")) {
    const m = line.match(/^\s*([a-z_]+\.[a-z_0-9]+)\s*[:=]\s*(.*?)\s*$/); if (m) out[m[1]] = m[2];
  }
  return out;
}

function applyPreset(name) {
  const byKey = Object.fromEntries(META.fields.map((f) => [f.key, f.default]));
  const preset = (META.presets[name] || {fields: {}}).fields;
  const extra = [];
  for (const key of FORM) { if (key.startsWith("data.") && key.endsWith("path")) continue;
    const v = key in preset ? preset[key] : byKey[key]; $("f-" + key).value = v == null ? "" : v; }
  for (const [k, v] of Object.entries(preset)) if (!FORM.includes(k)) extra.push(`${k}: ${Array.isArray(v) ? v.join(",") : v}`);
  $("f-extra").value = extra.join("\n");
  $("f-name").value = $("f-name").value || `${name}-${new Date().toISOString().slice(5, 16).replace(/[-:T]/g, "")}`;
  updatePlan();
}

let planTimer = null;
function updatePlan() {
  clearTimeout(planTimer);
  planTimer = setTimeout(async () => {
    $("plan-verdict").textContent = "planning…";
    try {
      const d = await api("/api/plan", {fields: formFields(), gpu_memory: $("f-gpu").value});
      $("plan-verdict").textContent = d.verdict; $("plan-text").textContent = d.text;
    } catch (e) { $("plan-verdict").textContent = e.message; $("plan-text").textContent = ""; }
  }, 300);
}

async function updatePreview() {
  const path = $("f-data.path").value;
  if (!path) { $("data-preview").textContent = ""; return; }
  $("data-preview").textContent = "reading…";
  try { $("data-preview").textContent = (await api("/api/preview", {path, fields: formFields()})).text; }
  catch (e) { $("data-preview").textContent = e.message; }
}

async function loadDataFiles(select) {
  const files = (await api("/api/data")).files;
  for (const id of ["f-data.path", "f-data.eval_path"]) {
    const el = $(id), keep = el.value;
    el.innerHTML = `<option value="">${id.includes("eval") ? "(none)" : "(choose)"}</option>` +
      files.map((f) => `<option>${esc(f)}</option>`).join("");
    el.value = id === "f-data.path" && select ? select : keep;
  }
}

async function pageLaunch() {
  show("launch");
  await loadDataFiles();
  document.body.dataset.loaded = "launch";
}

async function start() {
  $("launch-error").textContent = "";
  try {
    const d = await api("/api/launch", {name: $("f-name").value, fields: formFields()});
    $("f-name").value = "";
    location.hash = "#/run/" + encodeURIComponent(d.run);
  } catch (e) { $("launch-error").textContent = e.message; }
}

async function upload() {
  const file = $("f-upload").files[0]; if (!file) return;
  if (file.size > META.max_upload) { $("launch-error").textContent = `${file.name} is larger than the upload limit`; return; }
  try { const d = await api(`/api/upload?name=${encodeURIComponent(file.name)}`, file, true);
    await loadDataFiles(d.path); updatePreview(); }
  catch (e) { $("launch-error").textContent = e.message; }
}

// ---- chat ---------------------------------------------------------------------------------------
let CONV = {a: [], b: []};

async function targets(run) {
  const opts = [];
  for (const r of RUNS) {
    opts.push([`${r.name}|adapter`, `${r.name} (base + adapter)`]);
    if (r.name === run) {
      opts.push([`${r.name}|base`, `${r.name}: base only`]);
      const d = await api(`/api/runs/${encodeURIComponent(r.name)}`);
      d.exports.forEach((x) => opts.push([`${r.name}|exports/${x.name}`, `${r.name}: ${x.name}`]));
    }
  }
  return opts;
}

async function pageChat(run) {
  show("chat");
  RUNS = (await api("/api/runs")).runs;
  const opts = await targets(run);
  const html = opts.map(([v, t]) => `<option value="${esc(v)}">${esc(t)}</option>`).join("");
  $("chat-a").innerHTML = html; $("chat-b").innerHTML = `<option value="">(none)</option>` + html;
  if (run) $("chat-a").value = `${run}|adapter`;
  resetChat();
  document.body.dataset.loaded = "chat";
}

function resetChat() { CONV = {a: [], b: []}; $("chat-out-a").innerHTML = $("chat-out-b").innerHTML = "";
  $("chat-a-title").textContent = $("chat-a").value; $("chat-b-title").textContent = $("chat-b").value; }

async function say(side, target, text) {
  const out = $("chat-out-" + side);
  const [run, what] = target.split("|");
  CONV[side].push({role: "user", content: text});
  out.insertAdjacentHTML("beforeend", `<div class="user">› ${esc(text)}</div>`);
  const answer = document.createElement("div"); answer.className = "assistant"; out.appendChild(answer);
  answer.dataset.done = "0";
  const r = await fetch("/api/chat", {method: "POST", headers: {"content-type": "application/json"},
    body: JSON.stringify({run, what, messages: CONV[side], max_new_tokens: +$("chat-max").value, temperature: +$("chat-temp").value})});
  if (!r.ok) { answer.textContent = (await r.json().catch(() => ({}))).error || r.statusText; answer.dataset.done = "1"; return; }
  const reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "", text2 = "";
  for (;;) {
    const {value, done} = await reader.read(); if (done) break;
    buf += dec.decode(value, {stream: true});
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, i); buf = buf.slice(i + 2);
      const ev = (block.match(/^event: (.*)$/m) || [])[1], data = JSON.parse((block.match(/^data: (.*)$/m) || [, "{}"])[1]);
      if (ev === "piece") { text2 += data.text; answer.textContent = text2; }
      if (ev === "error") answer.textContent = text2 + " [error: " + data.error + "]";
    }
  }
  CONV[side].push({role: "assistant", content: text2});
  answer.dataset.done = "1";
}

async function send() {
  const text = $("chat-input").value.trim(); if (!text) return;
  $("chat-input").value = "";
  const jobs = [say("a", $("chat-a").value, text)];
  if ($("chat-b").value) jobs.push(say("b", $("chat-b").value, text));
  await Promise.all(jobs);
}

// ---- routing ------------------------------------------------------------------------------------
async function route() {
  closeLive();
  document.body.dataset.loaded = "";
  $("page-error").textContent = "";
  const [, page, arg] = location.hash.split("/");
  const name = arg ? decodeURIComponent(arg) : "";
  try {
    if (page === "run" && name) await pageRun(name);
    else if (page === "compare" && name) await pageCompare(name.split(","));
    else if (page === "launch") await pageLaunch();
    else if (page === "chat") await pageChat(name);
    else await pageRuns();
  } catch (e) { fail(e); }
}

function fail(e) { $("page-error").textContent = e.message || String(e); }

async function init() {
  META = await api("/api/meta");
  $("root-info").textContent = `runs: ${META.runs_root}`;
  $("f-preset").innerHTML = Object.entries(META.presets).map(([k, v]) => `<option value="${esc(k)}">${esc(v.title)}</option>`).join("");
  const choices = Object.fromEntries(META.fields.map((f) => [f.key, f.choices]));
  $("f-train.objective").innerHTML = ["auto", "sft", "dpo", "orpo", "kto", "simpo", "grpo"].map((o) => `<option>${o}</option>`).join("");
  $("f-model.quantization").innerHTML = ["nf4", "fp4", "int8", "none"].map((o) => `<option>${o}</option>`).join("");
  if (choices["model.quantization"] && choices["model.quantization"].length) $("f-model.quantization").innerHTML = choices["model.quantization"].map((o) => `<option>${o}</option>`).join("");
  $("export-quant").innerHTML = META.quants.map((q) => `<option ${q === "q8_0" ? "selected" : ""}>${q}</option>`).join("");
  $("f-preset").addEventListener("change", () => applyPreset($("f-preset").value));
  $("launch-form").addEventListener("change", (e) => { if (e.target.id === "f-data.path") updatePreview();
    if (e.target.id !== "f-upload") updatePlan(); });
  $("f-upload").addEventListener("change", upload);
  $("btn-start").addEventListener("click", start);
  $("runs-filter").addEventListener("input", renderRuns);
  document.querySelectorAll("th[data-key]").forEach((th) => th.addEventListener("click", () => {
    SORT = {key: th.dataset.key, dir: SORT.key === th.dataset.key ? -SORT.dir : 1}; renderRuns(); }));
  $("btn-compare").addEventListener("click", () => { location.hash = "#/compare/" +
    [...PICKED].map((n) => encodeURIComponent(n)).join(","); });
  const runName = () => $("run-name").textContent;
  const act = async (what, body) => { try { await api(`/api/runs/${encodeURIComponent(runName())}/${what}`, body || {}); await refreshRun(runName()); } catch (e) { fail(e); } };
  $("btn-stop").addEventListener("click", () => act("stop"));
  $("btn-resume").addEventListener("click", () => act("resume"));
  $("btn-export").addEventListener("click", () => act("export", {form: "gguf", quant: $("export-quant").value}));
  $("btn-merge").addEventListener("click", () => act("export", {form: "merged"}));
  $("btn-run-preview").addEventListener("click", async () => {
    $("run-preview").textContent = "reading…";
    try { $("run-preview").textContent = (await api(`/api/runs/${encodeURIComponent(runName())}/preview`, {})).text; }
    catch (e) { $("run-preview").textContent = e.message; } });
  $("btn-send").addEventListener("click", send);
  $("chat-input").addEventListener("keydown", (e) => { if (e.key === "Enter") send(); });
  $("btn-chat-reset").addEventListener("click", resetChat);
  ["chat-a", "chat-b"].forEach((id) => $(id).addEventListener("change", resetChat));
  applyPreset(Object.keys(META.presets)[0]);
  window.addEventListener("hashchange", route);
  // the runs page keeps itself current while shown
  setInterval(async () => { if ($("page-runs").classList.contains("shown")) { try { RUNS = (await api("/api/runs")).runs; renderRuns(); } catch (e) { /* shown on next load */ } } }, 3000);
  await route();
}
init();
