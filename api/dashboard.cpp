#include "api/dashboard.hpp"

#include "metrics/metrics.hpp"

#include <nlohmann/json.hpp>

#include <chrono>

namespace sy::api {

namespace {

// One page, no external requests: inline style and script; drawing on canvases. The element
// #state carries what was drawn (polls, heatmap cells with load, tokens shown, replica cells) as
// data attributes, for tests and scripts.
constexpr std::string_view page = R"html(<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Switchyard dashboard</title>
<style>
body{font:13px system-ui,sans-serif;margin:16px;background:#f6f6f4;color:#222}
h1{font-size:18px;margin:0 0 10px}h2{font-size:14px;margin:18px 0 6px}small{color:#666;font-weight:normal}
.kpis{display:flex;gap:10px;flex-wrap:wrap}.kpi{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px 12px;min-width:110px;color:#555}
.kpi b{display:block;font-size:18px;color:#111}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#eee}
canvas{background:#fff;border:1px solid #ddd}.row{display:flex;gap:28px;flex-wrap:wrap;align-items:flex-start}
#err{color:#b00;min-height:1em}
</style></head><body>
<h1>Switchyard <small id="model"></small></h1>
<div id="err"></div>
<div class="kpis">
<div class="kpi">placement epoch<b id="epoch">–</b></div>
<div class="kpi">hosts up<b id="hosts">–</b></div>
<div class="kpi">running / queued<b id="seq">–</b></div>
<div class="kpi">output tokens/s<b id="tps">–</b></div>
<div class="kpi">sequences finished<b id="reqs">–</b></div>
</div>
<h2>Latency <small>since start</small></h2>
<table id="lat"><tr><th></th><th>p50</th><th>p99</th><th>count</th></tr></table>
<div class="row">
<div><h2>Expert load <small id="loadwin"></small></h2><canvas id="heat" width="10" height="10"></canvas>
<div><small>cell: tokens routed to (layer, expert) / the layer's hottest expert; white = none</small></div></div>
<div><h2>Hottest experts</h2><table id="hot"><tr><th>layer</th><th>expert</th><th>tokens</th><th>share of layer</th><th>replicas</th></tr></table></div>
</div>
<h2>Replicas per expert <small>number of ready replicas</small></h2><canvas id="repl" width="10" height="10"></canvas>
<div id="state" data-polls="0" data-heat-cells="0" data-heat-tokens="0" data-replica-cells="0"></div>
<script>
"use strict";
let prev = null;
const $ = (id) => document.getElementById(id);
function fmt(s) { if (!(s > 0)) return "–"; return s < 1 ? (s * 1000).toFixed(1) + " ms" : s.toFixed(2) + " s"; }
function color(x) {
  x = Math.max(0, Math.min(1, x));
  if (x <= 0) return "#ffffff";
  const stops = [[255, 240, 200], [253, 174, 97], [215, 48, 39], [120, 0, 20]];
  const p = x * (stops.length - 1), i = Math.min(stops.length - 2, Math.floor(p)), f = p - i;
  const c = stops[i].map((v, k) => Math.round(v + (stops[i + 1][k] - v) * f));
  return "rgb(" + c.join(",") + ")";
}
function grid(canvas, layers, experts, value, label) {
  const cw = Math.max(3, Math.min(26, Math.floor(960 / Math.max(1, experts))));
  const ch = Math.max(3, Math.min(22, Math.floor(520 / Math.max(1, layers.length))));
  const left = 38, top = 14;
  canvas.width = left + cw * experts + 2; canvas.height = top + ch * layers.length + 2;
  const g = canvas.getContext("2d");
  g.fillStyle = "#fff"; g.fillRect(0, 0, canvas.width, canvas.height);
  g.font = "10px sans-serif";
  let nonzero = 0;
  const every = Math.max(1, Math.ceil(10 / ch));
  for (let i = 0; i < layers.length; i++) {
    if (i % every === 0) { g.fillStyle = "#444"; g.fillText("L" + layers[i], 2, top + i * ch + Math.min(ch, 10)); }
    for (let e = 0; e < experts; e++) {
      const v = value(i, e);
      if (v > 0) nonzero++;
      g.fillStyle = color(v);
      g.fillRect(left + e * cw, top + i * ch, cw - (cw > 4 ? 1 : 0), ch - (ch > 4 ? 1 : 0));
      if (label && cw >= 14 && ch >= 12) { g.fillStyle = v > 0.6 ? "#fff" : "#000"; g.fillText(label(i, e), left + e * cw + 3, top + i * ch + ch - 3); }
    }
  }
  g.fillStyle = "#444";
  for (let e = 0; e < experts; e += Math.max(1, Math.ceil(22 / cw))) g.fillText(String(e), left + e * cw, 10);
  return nonzero;
}
async function poll() {
  let d;
  try {
    const r = await fetch("/dashboard/data", {cache: "no-store"});
    d = await r.json();
    $("err").textContent = "";
  } catch (e) { $("err").textContent = "cannot reach the router: " + e; return; }
  $("model").textContent = d.model;
  $("epoch").textContent = d.epoch;
  $("hosts").textContent = d.hosts_up + " / " + d.hosts;
  $("seq").textContent = d.running + " / " + d.queued;
  $("reqs").textContent = d.requests;
  if (prev && d.time > prev.time) $("tps").textContent = ((d.generated_tokens - prev.generated_tokens) / (d.time - prev.time)).toFixed(1);
  const lat = $("lat");
  while (lat.rows.length > 1) lat.deleteRow(1);
  for (const [name, key] of [["time to first token", "ttft"], ["time per output token", "tpot"], ["end to end (HTTP)", "e2e"]]) {
    const q = d.latency[key], row = lat.insertRow();
    row.insertCell().textContent = name;
    row.insertCell().textContent = fmt(q.p50);
    row.insertCell().textContent = fmt(q.p99);
    row.insertCell().textContent = q.count;
  }
  const L = d.layers.length, E = d.experts;
  // Load: tokens since the previous poll when there were any, else since start.
  let load = d.tokens, win = "since start";
  if (prev && prev.layers.length === L && prev.experts === E) {
    const delta = d.tokens.map((row, i) => row.map((v, e) => v - prev.tokens[i][e]));
    if (delta.some((row) => row.some((v) => v > 0))) { load = delta; win = "last " + (d.time - prev.time).toFixed(1) + " s"; }
  }
  $("loadwin").textContent = win;
  const layerMax = load.map((row) => Math.max(0, ...row));
  let shown = 0;
  const cells = grid($("heat"), d.layers, E, (i, e) => { const v = load[i][e]; shown += v; return layerMax[i] > 0 ? v / layerMax[i] : 0; });
  const hot = [];
  for (let i = 0; i < L; i++) {
    const sum = load[i].reduce((a, b) => a + b, 0);
    for (let e = 0; e < E; e++) if (load[i][e] > 0) hot.push([d.layers[i], e, load[i][e], load[i][e] / sum, d.replicas.length ? d.replicas[i][e] : "–"]);
  }
  hot.sort((a, b) => b[2] - a[2]);
  const ht = $("hot");
  while (ht.rows.length > 1) ht.deleteRow(1);
  for (const h of hot.slice(0, 12)) {
    const row = ht.insertRow();
    row.insertCell().textContent = h[0]; row.insertCell().textContent = h[1]; row.insertCell().textContent = h[2];
    row.insertCell().textContent = (100 * h[3]).toFixed(1) + " %"; row.insertCell().textContent = h[4];
  }
  let rmax = 1;
  for (const row of d.replicas) for (const v of row) rmax = Math.max(rmax, v);
  const rcells = d.replicas.length === L ? grid($("repl"), d.layers, E, (i, e) => d.replicas[i][e] / rmax, (i, e) => String(d.replicas[i][e])) : 0;
  const st = $("state");
  st.dataset.polls = String(Number(st.dataset.polls) + 1);
  st.dataset.heatCells = String(cells);
  st.dataset.heatTokens = String(shown);
  st.dataset.replicaCells = String(rcells);
  prev = d;
}
poll();
setInterval(poll, 2000);
</script>
</body></html>
)html";

nlohmann::json quantile_json(const metrics::quantiles& q) { return {{"p50", q.p50}, {"p99", q.p99}, {"count", q.count}}; }

}  // namespace

std::string_view dashboard_page() { return page; }

std::string dashboard_data(const std::string& model, const cluster_view& view) {
  using nlohmann::json;
  const auto routed = metrics::routed_tokens();
  json j;
  j["model"] = model;
  j["time"] = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  j["epoch"] = view.epoch;
  j["hosts"] = view.hosts;
  j["hosts_up"] = view.hosts_up;
  // The layout is the routed-token table's when there is one (this process routes), else the view's.
  const auto& layers = routed.layers.empty() ? view.layers : routed.layers;
  const int experts = routed.layers.empty() ? view.experts : routed.experts;
  j["layers"] = layers;
  j["experts"] = experts;
  json tokens = json::array(), replicas = json::array();
  const size_t e_count = static_cast<size_t>(std::max(0, experts));
  for (size_t i = 0; i < layers.size(); ++i) {
    std::vector<uint64_t> row(e_count, 0);
    if (!routed.layers.empty())
      for (size_t e = 0; e < e_count; ++e) row[e] = routed.tokens[i * e_count + e];
    tokens.push_back(row);
  }
  if (view.layers == layers && view.experts == experts && view.replicas.size() == layers.size() * e_count)
    for (size_t i = 0; i < layers.size(); ++i)
      replicas.push_back(std::vector<int>(view.replicas.begin() + static_cast<std::ptrdiff_t>(i * e_count),
                                          view.replicas.begin() + static_cast<std::ptrdiff_t>((i + 1) * e_count)));
  j["tokens"] = std::move(tokens);
  j["replicas"] = std::move(replicas);
  j["latency"] = {{"ttft", quantile_json(metrics::histogram_quantiles(metrics::family::time_to_first_token))},
                  {"tpot", quantile_json(metrics::histogram_quantiles(metrics::family::time_per_output_token))},
                  {"e2e", quantile_json(metrics::histogram_quantiles(metrics::family::http_request_duration, "/v1/completions"))}};
  j["prompt_tokens"] = metrics::total(metrics::family::prompt_tokens);
  j["generated_tokens"] = metrics::total(metrics::family::generated_tokens);
  j["requests"] = metrics::total(metrics::family::sequences_finished);
  j["running"] = metrics::total(metrics::family::sequences_running);
  j["queued"] = metrics::total(metrics::family::sequences_queued);
  return j.dump();
}

}  // namespace sy::api
