// stm-agent dashboard: history from /api, live updates from /api/events (server-sent events).
// No framework, no CDN: the microscope PC is often offline. Text from the agent is always set
// with textContent (never parsed as HTML).
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";
// Okabe & Ito (2008) colour-blind-safe palette, same order as the overlay PNGs; `other` grey.
const PALETTE = ["#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7", "#ffffff"];
const OTHER = "other", OTHER_COLOUR = "#969696";

const state = {
  info: null, frames: [], byId: new Map(), shown: null, detail: null, species: [],
  firings: [], refs: [], health: null, healthAt: 0, token: null, picked: null, discovery: null,
};
// For tests and the latency benchmark: when each live frame was on screen (epoch ms); the
// discovery states and stages the page has shown.
window.stmDash = { rendered: [], ready: false, discovery: [] };

const $ = (id) => document.getElementById(id);
function el(tag, attrs = {}, ...children) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVGNS, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined) continue;
    if (k === "text") e.textContent = v;
    else if (k === "class") e.setAttribute("class", v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}
function colour(species) {
  if (species === OTHER) return OTHER_COLOUR;
  const named = state.species.filter((s) => s !== OTHER);
  const i = named.indexOf(species);
  return PALETTE[(i < 0 ? named.length : i) % PALETTE.length];
}
const fmt = (x, d = 3) => (x === null || x === undefined || !isFinite(x)) ? "–" : Number(x).toPrecision(d).replace(/\.?0+e/, "e");
const time = (iso) => iso ? new Date(iso).toLocaleTimeString([], { hour12: false }) : "–";
function siPrefix(v, unit) {
  if (v === null || v === undefined) return "–";
  const a = Math.abs(v);
  const p = a >= 1 || a === 0 ? ["", 1] : a >= 1e-3 ? ["m", 1e3] : a >= 1e-6 ? ["µ", 1e6] : a >= 1e-9 ? ["n", 1e9] : ["p", 1e12];
  return `${+(v * p[1]).toPrecision(3)} ${p[0]}${unit}`;
}

async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {});
  if (state.token) headers["Authorization"] = "Bearer " + state.token;
  const r = await fetch(path, Object.assign({}, opts, { headers }));
  const body = r.headers.get("content-type")?.includes("json") ? await r.json() : null;
  if (!r.ok) throw new Error((body && (body.error || body.detail)) || `${r.status} ${r.statusText}`);
  return body;
}

// ------------------------------------------------------------------ species & history
function updateSpecies() {
  const set = new Set(state.species);
  for (const f of state.frames) for (const s of Object.keys(f.counts || {})) set.add(s);
  for (const r of state.refs) set.add(r.species);
  const named = [...set].filter((s) => s !== OTHER).sort();
  state.species = named.concat(set.has(OTHER) || named.length ? [OTHER] : []);
}
function addFrame(f) {
  if (state.byId.has(f.frame_id)) return false;
  const summary = Object.assign({}, f);
  delete summary.detections;
  state.byId.set(f.frame_id, summary);
  state.frames.push(summary);
  state.frames.sort((a, b) => (a.processed_at < b.processed_at ? -1 : 1));
  return true;
}
async function loadHistory() {
  const r = await api(`/api/frames?range=${encodeURIComponent($("range").value)}`);
  state.frames = []; state.byId.clear();
  for (const f of r.frames) addFrame(f);
  updateSpecies(); drawSeries(); drawTable();
  const last = lastOk();
  if (last && (!state.shown || $("follow").checked)) await showFrame(last.frame_id);
  drawLatestError();
}
// Following live shows the newest frame that has an image; a newer error frame is announced above it.
function lastOk() { for (let i = state.frames.length - 1; i >= 0; i--) if (state.frames[i].status === "ok") return state.frames[i]; return null; }
function drawLatestError() {
  const f = state.frames[state.frames.length - 1], box = $("latest-error");
  box.hidden = !(f && f.status === "error" && $("follow").checked);
  if (!box.hidden) box.textContent = `newest frame ${f.name} (${time(f.processed_at)}) was not processed: ${f.reason}`;
}

// ------------------------------------------------------------------ the frame and its overlay
async function showFrame(frameId, live = null) {
  const detail = live && live.frame_id === frameId ? live : await api(`/api/frames/${frameId}`);
  state.shown = frameId; state.detail = detail; state.picked = null;
  $("pick").hidden = true;
  $("frame-title").textContent = $("follow").checked && frameId === lastOk()?.frame_id ? "Latest frame" : "Frame";
  drawMeta(detail);
  const view = $("frame-view"), img = $("frame-img"), miss = $("frame-missing");
  const sc = detail.scan || {};
  const [nx, ny] = sc.pixels || [1, 1];
  const [w, h] = sc.range_nm || [nx, ny];
  view.style.aspectRatio = `${w} / ${h}`;
  const svg = $("overlay");
  svg.setAttribute("viewBox", `0 0 ${nx} ${ny}`);
  svg.replaceChildren();
  // resolved by this image's load, or by the load of a newer frame's image that replaced it
  const loaded = new Promise((resolve) => {
    if (!detail.image) { img.removeAttribute("src"); resolve(); return; }
    const done = () => { img.removeEventListener("load", done); img.removeEventListener("error", done); resolve(); };
    img.addEventListener("load", done);
    img.addEventListener("error", done);
    img.src = `/api/frames/${frameId}/image.png`;
  });
  miss.hidden = !!detail.image;
  miss.textContent = detail.status === "error" ? `not processed: ${detail.reason}` :
    "display image no longer kept (dashboard.keep_images)";
  for (const [i, d] of (detail.detections || []).entries()) {
    const [x, y, bw, bh] = d.bbox_px;
    const r = el("svg:rect", { x, y, width: Math.max(bw, 1), height: Math.max(bh, 1), "data-i": i,
      class: d.touches_edge ? "edge" : "obj", "data-species": d.species });
    if (!d.touches_edge) r.style.stroke = colour(d.species);
    r.addEventListener("mousemove", (ev) => tooltip(ev, d));
    r.addEventListener("mouseleave", () => ($("tooltip").hidden = true));
    r.addEventListener("click", () => pick(i));
    svg.append(r);
  }
  drawCounts(detail);
  drawTable();
  await loaded;
}
function drawMeta(d) {
  const sc = d.scan || {};
  const m = $("frame-meta");
  m.replaceChildren();
  const parts = [
    ["", d.name],
    ["channel ", `${d.channel || state.info?.channel} ${d.direction || state.info?.direction}`],
    ["scan ", sc.range_nm ? `${fmt(sc.range_nm[0])} × ${fmt(sc.range_nm[1])} nm (${sc.pixels?.[0]} × ${sc.pixels?.[1]} px)` : "–"],
    ["bias ", siPrefix(sc.bias_V, "V")],
    ["setpoint ", siPrefix(sc.setpoint_A, "A")],
    ["lines ", sc.completeness === undefined || sc.completeness === null ? "–" : `${Math.round(sc.completeness * 100)} % acquired`],
    ["", time(d.processed_at)],
  ];
  parts.forEach(([k, v], i) => { if (i) m.append(" · "); m.append(k, el("b", { text: v ?? "–" })); });
  if (d.status === "error") m.append(el("div", { class: "err", text: `error: ${d.reason}` }));
}
function drawCounts(d) {
  const box = $("frame-counts");
  box.replaceChildren();
  const edge = (d.detections || []).filter((x) => x.touches_edge).length;
  for (const [s, n] of Object.entries(d.counts || {}))
    box.append(el("span", { class: "chip", "data-species": s }, el("i", { style: `background:${colour(s)}` }), `${s} `, el("b", { text: String(n) })));
  if (d.status === "ok") box.append(el("span", { class: "chip", style: "color:var(--dim)" }, `cut by the edge: ${edge}`));
}
function tooltip(ev, d) {
  const t = $("tooltip");
  t.replaceChildren(
    el("div", {}, el("b", { text: d.species }), d.touches_edge ? " (cut by the edge, not counted)" : ""),
    el("div", { text: `${Object.keys(d.scores || {}).length ? "score " + fmt(d.similarity) : "no reference to compare"} · size ${fmt(d.area_nm2)} nm²` }),
    el("div", { text: `position ${fmt(d.centroid_nm[0], 4)}, ${fmt(d.centroid_nm[1], 4)} nm` }));
  t.hidden = false;
  t.style.left = ev.clientX + 14 + "px"; t.style.top = ev.clientY + 12 + "px";
}

// ------------------------------------------------------------------ pick an object -> reference
function pick(i) {
  const d = state.detail.detections[i];
  state.picked = i;
  for (const r of $("overlay").children) r.classList.toggle("picked", r.dataset.i === String(i));
  $("pick").hidden = false;
  $("pick-what").textContent = `object at ${fmt(d.centroid_nm[0], 4)}, ${fmt(d.centroid_nm[1], 4)} nm ` +
    `(${Math.round(d.centroid_px[0])}, ${Math.round(d.centroid_px[1])} px), ${fmt(d.area_nm2)} nm², now ${d.species}`;
  const can = canEdit();
  $("pick-add").disabled = !can;
  $("pick-msg").className = can ? "" : "err";
  $("pick-msg").textContent = can ? "" : readOnlyWhy();
  if (can) $("pick-species").focus();
}
function canEdit() { return !!(state.info && state.info.writable && state.token); }
function readOnlyWhy() {
  return state.info && state.info.writable ? "read-only in this browser: enter the token (top right) to edit references"
    : "read-only dashboard: the agent's configuration sets no dashboard.token";
}
async function addReference(ev) {
  ev.preventDefault();
  const d = state.detail.detections[state.picked];
  const species = $("pick-species").value.trim();
  $("pick-msg").className = ""; $("pick-msg").textContent = "adding…";
  try {
    const r = await api("/api/references", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ frame_id: state.shown, x_px: d.centroid_px[0], y_px: d.centroid_px[1], species }) });
    await loadRefs();  // the gallery shows it before the page says so
    $("pick-msg").className = "okmsg";
    $("pick-msg").textContent = `added ${r.species}/${r.id}; the agent uses it from the next frame`;
  } catch (e) {
    $("pick-msg").className = "err"; $("pick-msg").textContent = String(e.message || e);
  }
}

// ------------------------------------------------------------------ time series (plain SVG)
function niceTicks(lo, hi, n = 5) {
  if (!(hi > lo)) hi = lo + 1;
  const step0 = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(step0)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= step0);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9 * step; v += step) out.push(+v.toPrecision(12));
  return out;
}
function drawSeries() {
  const svg = $("series"), metric = $("metric").value;
  const W = svg.clientWidth || 600, H = svg.clientHeight || 240, L = 48, R = 10, T = 10, B = 26;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.replaceChildren();
  const ok = state.frames.filter((f) => f.status === "ok");
  const legend = $("series-legend");
  legend.replaceChildren();
  if (!ok.length) {
    svg.append(el("svg:text", { x: W / 2, y: H / 2, "text-anchor": "middle", text: "no frame in this range yet" }));
    return;
  }
  // a species absent from a frame's counts was not in the library then: a gap, not a zero
  const val = (f, s) => !(s in f.counts) ? null : metric === "density" ? (f.density ? f.density[s] : null) : f.counts[s];
  const ts = state.frames.map((f) => Date.parse(f.processed_at));
  let t0 = Math.min(...ts), t1 = Math.max(...ts);
  if (t1 - t0 < 10000) { t0 -= 5000; t1 += 5000; }
  let ymax = 0;
  for (const f of ok) for (const s of state.species) { const v = val(f, s); if (v !== null) ymax = Math.max(ymax, v); }
  const yt = niceTicks(0, ymax > 0 ? ymax * 1.05 : 1);
  const y1 = yt[yt.length - 1];
  const X = (t) => L + (t - t0) / (t1 - t0) * (W - L - R), Y = (v) => H - B - v / y1 * (H - T - B);
  for (const v of yt) {
    svg.append(el("svg:line", { x1: L, x2: W - R, y1: Y(v), y2: Y(v), class: "grid" }));
    svg.append(el("svg:text", { x: L - 6, y: Y(v) + 4, "text-anchor": "end", text: metric === "density" ? fmt(v, 2) : String(v) }));
  }
  const step = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400]
    .map((x) => x * 1000).find((x) => (t1 - t0) / x <= Math.max(2, Math.floor((W - L - R) / 80))) || 86400000;
  for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) {
    const label = new Date(t).toLocaleTimeString([], { hour12: false, hour: "2-digit", minute: "2-digit", second: step < 60000 ? "2-digit" : undefined });
    svg.append(el("svg:line", { x1: X(t), x2: X(t), y1: H - B, y2: H - B + 4, class: "axis" }));
    const anchor = X(t) > W - R - 28 ? "end" : X(t) < L + 28 ? "start" : "middle";  // keep labels inside
    svg.append(el("svg:text", { x: X(t), y: H - 8, "text-anchor": anchor, text: label }));
  }
  svg.append(el("svg:line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
  svg.append(el("svg:text", { x: 4, y: T + 2, "dominant-baseline": "hanging", text: metric === "density" ? "/nm²" : "n" }));
  for (const s of state.species) {
    const pts = ok.map((f) => [X(Date.parse(f.processed_at)), val(f, s)]).filter((p) => p[1] !== null);
    if (!pts.length) continue;
    const c = colour(s);
    svg.append(el("svg:polyline", { points: pts.map((p) => `${p[0].toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" "),
      fill: "none", stroke: c, "stroke-width": 1.6, "data-species": s, class: "series" }));
    if (pts.length <= 300) for (const p of pts) svg.append(el("svg:circle", { cx: p[0], cy: Y(p[1]), r: 2.4, fill: c }));
    legend.append(el("span", { class: "chip" }, el("i", { style: `background:${c}` }), s));
  }
  for (const f of state.frames.filter((f) => f.status === "error")) {
    const x = X(Date.parse(f.processed_at));
    svg.append(el("svg:line", { x1: x, x2: x, y1: H - B - 8, y2: H - B, stroke: "#e0524a", "stroke-width": 2 },
      el("svg:title", { text: `${f.name}: ${f.reason}` })));
  }
  legend.append(el("span", { class: "chip", style: "color:var(--dim)" },
    `${ok.length} frames` + (state.frames.length > ok.length ? `, ${state.frames.length - ok.length} errors (red ticks)` : "")));
}

// ------------------------------------------------------------------ table, triggers, references, health
function drawTable() {
  const body = $("frames").tBodies[0];
  body.replaceChildren();
  const last = state.frames.slice(-20).reverse();
  if (!last.length) body.append(el("tr", {}, el("td", { colspan: 6, class: "empty", text: "no frame recorded in this range" })));
  for (const f of last) {
    const counts = f.status === "ok" ? Object.entries(f.counts).map(([k, v]) => `${k}=${v}`).join(" ") : f.reason;
    const tr = el("tr", { onclick: () => { $("follow").checked = false; showFrame(f.frame_id); }, "data-frame": f.frame_id,
      class: f.frame_id === state.shown ? "shown" : null },
      el("td", { text: time(f.processed_at) }), el("td", { text: f.name, title: f.name }),
      el("td", { class: `status-${f.status}`, text: f.status }), el("td", { text: counts || "", title: counts || "" }),
      el("td", { text: f.status === "ok" ? String(f.n_objects) : "" }),
      el("td", { text: f.latency_ms === null || f.latency_ms === undefined ? "–" : `${Math.round(f.latency_ms)} ms` }));
    body.append(tr);
  }
}
async function loadTriggers() {
  const r = await api("/api/triggers");
  state.firings = r.firings;
  drawTriggers();
}
function actionText(a, res) {
  if (a.type === "publish") return "published";
  if (!res) return `${a.type}: running`;
  if (res.type === "command") return res.timed_out ? `command timed out` : res.error ? `command: ${res.error}` : `command exit ${res.exit_status}`;
  if (res.type === "nanonis") return res.dry_run ? `${res.action}: dry run` : res.sent ? `${res.action}: sent` : `${res.action}: ${res.error}`;
  return a.type;
}
function drawTriggers() {
  const ul = $("triggers");
  ul.replaceChildren();
  if (!state.firings.length) { ul.append(el("li", { class: "empty", text: "none" })); return; }
  for (const f of state.firings.slice(0, 50)) {
    const e = f.event || f;
    const acts = (e.actions || []).map((a, i) => actionText(a, (f.results || [])[i])).join(" · ");
    ul.append(el("li", { "data-rule": e.rule }, el("b", { text: e.rule }),
      ` ${e.metric}${e.species ? " " + e.species.join("+") : ""} = ${fmt(e.observed)} ${e.comparison} ${e.value}`,
      el("div", { class: "sub", text: `${time(e.fired_at)} · ${e.name} · ${acts}` })));
  }
}
let refsAsked = 0;
async function loadRefs() {
  // several loads may overlap (a click, the "references" event): only the latest one is drawn
  const mine = ++refsAsked;
  const r = await api("/api/references");
  if (mine !== refsAsked) return;
  state.refs = r.references;
  updateSpecies();
  const box = $("refs");
  box.replaceChildren();
  if (!state.refs.length) box.append(el("div", { class: "empty", text: "no reference yet: click an object in the frame and name it" }));
  for (const ref of state.refs) {
    const pos = ref.position_nm ? `${fmt(ref.position_nm[0], 4)}, ${fmt(ref.position_nm[1], 4)} nm` : "";
    const card = el("div", { class: "card", "data-species": ref.species },
      el("img", { src: `/api/references/${encodeURIComponent(ref.species)}/${encodeURIComponent(ref.id)}.png`, alt: ref.species }),
      el("div", { class: "sp" }, el("i", { style: `display:inline-block;width:10px;height:10px;margin-right:5px;background:${colour(ref.species)}` }), ref.species),
      el("div", { class: "sub", text: ref.scan || "", title: ref.scan || "" }), el("div", { class: "sub", text: pos }));
    if (canEdit()) card.append(el("button", { text: "remove", onclick: async () => {
      if (!confirm(`Remove this reference of ${ref.species}?`)) return;
      try { await api(`/api/references/${encodeURIComponent(ref.species)}/${encodeURIComponent(ref.id)}`, { method: "DELETE" }); }
      catch (e) { alert(e.message || e); }
      await loadRefs();
    } }));
    box.append(card);
  }
}
// ------------------------------------------------------------------ species discovery
const STAGES = { starting: "starting", reading: "reading scans", segmenting: "segmenting scans", training: "training the autoencoder",
  embedding: "embedding the objects", clustering: "clustering", writing: "writing the gallery" };
async function loadDiscoveryFolders() {
  const r = await api("/api/discovery/folders");
  const sel = $("disc-source");
  for (const o of [...sel.options]) if (o.value.startsWith("folder:")) o.remove();
  for (const f of r.folders) sel.append(el("option", { value: "folder:" + f.folder, text: `folder ${f.folder} (${f.scans}${f.more ? "+" : ""} scans)` }));
}
async function runDiscovery() {
  const [source, rest] = $("disc-source").value.split(/:(.*)/s);
  const body = source === "folder" ? { source, folder: rest } : { source, range: rest };
  $("disc-run").disabled = true;
  try { drawDiscovery(await api("/api/discovery", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) })); }
  catch (e) { $("disc-run").disabled = false; $("disc-status").className = "meta err"; $("disc-status").textContent = String(e.message || e); }
}
let discShown = null;  // the run whose clusters are drawn (progress events do not redraw them)
function drawDiscovery(st) {
  state.discovery = st;
  const status = $("disc-status"), prog = $("disc-progress"), running = st.state === "running";
  $("disc-run").disabled = running || !canEdit();
  $("disc-run").title = canEdit() ? "" : readOnlyWhy();
  $("disc-cancel").hidden = !(running && canEdit());
  prog.hidden = !running;
  status.className = "meta" + (st.state === "failed" ? " err" : "");
  status.title = "";
  window.stmDash.discovery.push(st.state === "running" ? st.stage : st.state);
  const input = st.source === "folder" ? `folder ${st.folder}` + (st.n_found > st.n_scans ? ` (newest ${st.n_scans} of ${st.n_found} scans)` : "")
    : st.source === "frames" ? `${st.n_scans} recorded frames` : "";
  if (running) {
    const stage = STAGES[st.stage] || st.stage;
    const per = (st.stage === "reading" || st.stage === "segmenting") && st.total ? ` ${st.done} / ${st.total}` : "";
    status.textContent = `running on ${input}: ${stage}${per}…`;
    const order = ["starting", "reading", "segmenting", "training", "embedding", "clustering", "writing"];
    const i = Math.max(0, order.indexOf(st.stage)), frac = st.total ? st.done / st.total : 0;
    prog.value = (i + (per ? frac : 0)) / order.length;
  } else if (st.state === "failed") status.textContent = `discovery on ${input} failed: ${st.error}`;
  else if (st.state === "cancelled") status.textContent = `discovery on ${input} cancelled`;
  const res = st.result;
  if (st.state === "done" && res) {
    status.textContent = `${res.n_objects} objects in ${res.n_scans} scans → ${res.k} clusters ` +
      `(${res.embedding} / ${res.method}, silhouette ${fmt(res.silhouette, 2)}; run ${res.run}` +
      (res.n_skipped ? `; ${res.n_skipped} scans skipped` : "") + "). Name a cluster to adopt its most typical objects as references.";
    if (res.n_skipped) status.title = res.skipped.map((s) => `${s.scan}: ${s.reason}`).join("\n");
  }
  if (!res || discShown === res.run) { if (res) drawAdoptable(); return; }
  discShown = res.run;
  const box = $("disc-clusters");
  box.replaceChildren();
  for (const c of res.clusters) {
    const colour = PALETTE[c.cluster % PALETTE.length];
    const unit = res.height_unit === "pm" ? "pm" : "σ";
    const input = el("input", { autocomplete: "off", placeholder: "species name", "aria-label": `species name for cluster ${c.cluster}`,
      pattern: "[A-Za-z0-9][A-Za-z0-9_.+\\-]{0,63}", required: "" });
    const msg = el("div", { class: "dmsg" });
    const form = el("form", {}, input, el("button", { type: "submit", class: "adopt", text: "Adopt" }));
    form.addEventListener("submit", (ev) => adoptCluster(ev, res.run, c.cluster, input, msg));
    const crops = el("div", { class: "crops" }, ...c.medoids.slice(0, 5).map((m) =>
      el("img", { src: m.image, alt: `cluster ${c.cluster}`, title: `${m.scan} @ ${Math.round(m.x_px)}, ${Math.round(m.y_px)} px` })),
      el("a", { href: c.image, target: "_blank", rel: "noopener", text: `all ${c.n} →` }));
    box.append(el("div", { class: "dcluster", "data-cluster": c.cluster, style: `border-left-color:${colour}` },
      el("div", { class: "dinfo" }, el("div", { class: "dname", text: `cluster ${c.cluster}` }),
        el("div", { class: "sub", text: `${c.n} object${c.n === 1 ? "" : "s"} · ${fmt(c.area_nm2)} nm² · ${fmt(c.extent_nm)} nm across · ` +
          `${fmt(c.height)} ${unit} high${c.depressions > 0 ? ` · ${Math.round(c.depressions * 100)} % depressions` : ""}` }), form),
      crops, msg));
  }
  drawAdoptable();
}
function drawAdoptable() {
  for (const b of document.querySelectorAll("#disc-clusters button.adopt")) { b.disabled = !canEdit(); b.title = canEdit() ? "" : readOnlyWhy(); }
}
async function adoptCluster(ev, run, cluster, input, msg) {
  ev.preventDefault();
  const species = input.value.trim();
  msg.className = "dmsg"; msg.textContent = "adopting…";
  try {
    const r = await api("/api/discovery/adopt", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ run, cluster, species }) });
    await loadRefs();  // the gallery shows them before the page says so
    msg.className = "dmsg okmsg";
    msg.textContent = `adopted as ${r.species}: ${r.ids.length} references; the agent counts ${r.species} from the next frame`;
  } catch (e) { msg.className = "dmsg err"; msg.textContent = String(e.message || e); }
}

function drawHealth() {
  const h = state.health, box = $("health"), txt = $("health-text");
  if (!h || !h.heartbeat || h.heartbeat_age_s === null) {
    box.className = "health down";
    txt.textContent = h && h.status && h.status.state === "stopping" ? "agent stopped" :
      h && h.endpoint ? `no heartbeat from the agent (${h.endpoint})` : "no live feed (history only)";
    return;
  }
  const hb = h.heartbeat, age = h.heartbeat_age_s + (Date.now() - state.healthAt) / 1000;
  box.className = "health " + (age < 15 ? "up" : "down");
  // the sources' own statistics: a thread that died, a watcher that stopped, Nanonis unreachable
  const src = Object.entries(hb.sources || {}).map(([n, s]) => {
    const bad = s.error ? "error" : s.alive === false || s.observer_alive === false ? "stopped"
      : s.connected === false ? "not connected" : null;
    return `${n} ${bad || "up"}`;
  }).join(", ") || "none";
  txt.textContent = `heartbeat ${age.toFixed(0)} s ago · ${hb.frames_done} frames, ${hb.errors} errors · queue ${hb.queue_depth}` +
    ` · sources ${src}`;
}
function drawMode() {
  const m = $("mode");
  m.replaceChildren();
  if (!state.info) return;
  if (!state.info.writable) { m.textContent = "read-only"; return; }
  if (state.token) { m.textContent = "editing allowed"; return; }
  const inp = el("input", { type: "password", placeholder: "token to edit references", "aria-label": "token" });
  inp.addEventListener("change", () => { state.token = inp.value.trim() || null; sessionStorage.setItem("stmToken", state.token || ""); drawMode(); loadRefs(); if (state.discovery) drawDiscovery(state.discovery); });
  m.append(inp);
}

// ------------------------------------------------------------------ live
function connect() {
  const es = new EventSource("/api/events");
  let dropped = false;
  es.addEventListener("open", () => { if (dropped) { dropped = false; loadHistory(); loadTriggers(); } });
  es.addEventListener("error", () => { dropped = true; });
  es.addEventListener("health", (e) => { state.health = JSON.parse(e.data); state.healthAt = Date.now(); drawHealth(); });
  es.addEventListener("frame", async (e) => {
    const f = JSON.parse(e.data);
    if (addFrame(f)) { updateSpecies(); drawSeries(); }  // else already loaded (history reloaded after a reconnect)
    try {
      if ($("follow").checked && f.status === "ok") await showFrame(f.frame_id, f); else drawTable();
    } catch (err) { console.error("cannot show frame", f.frame_id, err); }
    drawLatestError();
    window.stmDash.rendered.push({ frame_id: f.frame_id, seq: f.seq, t: performance.timeOrigin + performance.now() });
  });
  es.addEventListener("trigger", (e) => {
    const ev = JSON.parse(e.data);
    state.firings.unshift({ event: ev, results: [] });
    drawTriggers();
    setTimeout(loadTriggers, 3000);
  });
  es.addEventListener("references", () => loadRefs());
  es.addEventListener("discovery", (e) => drawDiscovery(JSON.parse(e.data)));
}

async function main() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) { sessionStorage.setItem("stmToken", decodeURIComponent(m[1])); history.replaceState(null, "", location.pathname); }
  state.token = sessionStorage.getItem("stmToken") || null;
  state.info = await api("/api/info");
  $("agent-id").textContent = state.info.agent_id;
  drawMode();
  $("pick").addEventListener("submit", addReference);
  $("pick-cancel").addEventListener("click", () => { $("pick").hidden = true; for (const r of $("overlay").children) r.classList.remove("picked"); });
  $("metric").addEventListener("change", drawSeries);
  $("range").addEventListener("change", loadHistory);
  $("follow").addEventListener("change", () => { const last = lastOk(); drawLatestError(); if ($("follow").checked && last) showFrame(last.frame_id); });
  window.addEventListener("resize", drawSeries);
  setInterval(drawHealth, 1000);
  connect();
  state.health = await api("/api/health"); state.healthAt = Date.now(); drawHealth();
  $("disc-run").addEventListener("click", runDiscovery);
  $("disc-cancel").addEventListener("click", () => api("/api/discovery/cancel", { method: "POST" }).catch((e) => alert(e.message || e)));
  await Promise.all([loadRefs(), loadTriggers(), loadDiscoveryFolders(), api("/api/discovery").then(drawDiscovery)]);
  await loadHistory();
  window.stmDash.ready = true;
}
main().catch((e) => { $("health-text").textContent = "dashboard error: " + (e.message || e); });
