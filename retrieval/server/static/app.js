// crossfind's search page: plain JavaScript over the JSON API (no build step).
"use strict";
const $ = (id) => document.getElementById(id);
const PAGE = 30;
const state = { k: PAGE, file: null, imageId: null, terms: [], hits: [], target: "images", sel: -1, detail: null, model: "", library: "" };

function targetValue() { return document.querySelector('input[name="target"]:checked').value; }

function options() {
  const o = { target: targetValue(), k: state.k, rerank: $("f-rerank").checked };
  const thr = parseFloat($("f-threshold").value);
  if (thr > 0) o.threshold = thr;
  if ($("f-path").value.trim()) o.path = $("f-path").value.trim();
  if ($("f-since").value) o.since = $("f-since").value;
  if ($("f-until").value) o.until = $("f-until").value;
  if ($("f-corpus").value) o.corpus = $("f-corpus").value;
  if ($("f-model").value && $("f-model").value !== state.model) o.model = $("f-model").value;
  return o;
}

async function api(url, init) {
  const r = await fetch(url, init);
  let body = null;
  try { body = await r.json(); } catch (e) { body = null; }
  if (!r.ok) throw new Error((body && body.error) || `HTTP ${r.status}`);
  return { body, notes: JSON.parse(r.headers.get("X-Crossfind-Notes") || "[]") };
}

async function search(more) {
  if (!more) { state.k = PAGE; state.sel = -1; }
  const q = $("q").value.trim();
  if (!q && !state.file && state.imageId == null && !state.terms.length) return;
  const o = options();
  if (q) o.q = q;
  if (state.terms.length) o.terms = state.terms.map((t) => t.imageId != null ? { weight: t.weight, image_id: t.imageId } : { weight: t.weight, text: t.text });
  let init;
  if (state.file) {
    const fd = new FormData();
    fd.append("file", state.file);
    for (const [k, v] of Object.entries(o)) fd.append(k, typeof v === "object" ? JSON.stringify(v) : String(v));
    init = { method: "POST", body: fd };
  } else {
    if (state.imageId != null) o.image_id = state.imageId;
    init = { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(o) };
  }
  $("summary").textContent = "searching…";
  const t0 = performance.now();
  try {
    const { body, notes } = await api("/api/search", init);
    state.target = o.target;
    render(body, more, performance.now() - t0);
    $("notes").textContent = notes.join(" ");
    loadRecent();
  } catch (e) {
    $("summary").textContent = e.message;
    $("notes").textContent = "";
  }
}

function fmt(x) { return x == null ? "–" : x.toFixed(3); }

function render(res, more, ms) {
  const grid = $("grid"), texts = $("texts");
  const start = more ? state.hits.length : 0;
  if (!more) { grid.innerHTML = ""; texts.innerHTML = ""; }
  const fresh = res.hits.slice(start);
  state.hits = res.hits;
  for (const h of fresh) {
    if (h.kind === "image") {
      const card = document.createElement("div");
      card.className = "card"; card.tabIndex = -1; card.dataset.rank = h.rank;
      const img = document.createElement("img");
      img.loading = "lazy"; img.alt = h.path; img.src = `/api/thumbs/${h.id}?size=256`;
      const cap = document.createElement("div");
      cap.className = "cap";
      cap.innerHTML = `<span title="dual-encoder score">${fmt(h.score)}</span>` +
        (h.rerank_score != null ? `<span class="prob" title="match probability">${(100 * h.rerank_score).toFixed(1)}%</span>` : "");
      card.append(img, cap);
      card.addEventListener("click", () => openDetail(h.rank - 1));
      grid.append(card);
    } else {
      const li = document.createElement("li");
      li.textContent = h.text;
      const s = document.createElement("span");
      s.className = "score";
      s.textContent = fmt(h.score) + (h.rerank_score != null ? ` · ${(100 * h.rerank_score).toFixed(1)}%` : "");
      li.append(s);
      texts.append(li);
    }
  }
  const what = res.query.text ? `"${res.query.text}"` : res.query.image ? "image" : "terms";
  $("summary").textContent = `${res.hits.length} ${state.target} for ${what} · ${res.model}` + (res.reranked ? " · re-ranked" : "") + ` · ${Math.round(ms)} ms`;
  $("more").hidden = res.hits.length < state.k;
  select(state.sel);
}

function items() { return state.target === "images" ? [...$("grid").children] : [...$("texts").children]; }

function select(i) {
  const all = items();
  all.forEach((el) => el.classList.remove("sel"));
  if (i < 0 || !all.length) { state.sel = -1; return; }
  state.sel = Math.max(0, Math.min(i, all.length - 1));
  all[state.sel].classList.add("sel");
  all[state.sel].scrollIntoView({ block: "nearest" });
}

async function openDetail(i) {
  const h = state.hits[i];
  if (!h || h.kind !== "image") return;
  state.detail = h; state.sel = i; select(i);
  $("d-img").src = `/api/files/${h.id}`;
  $("d-open").href = `/api/files/${h.id}`;
  $("d-path").textContent = h.path;
  $("d-info").textContent = "";
  $("d-caps").innerHTML = "";
  $("detail").hidden = false;
  try {
    const { body } = await api(`/api/items/images/${h.id}`);
    $("d-info").textContent = [body.width && `${body.width}×${body.height}`, body.date && body.date.replace("T", " "),
      `${Math.round(body.size / 1024)} KB`, `score ${fmt(h.score)}`, h.rerank_score != null && `match ${(100 * h.rerank_score).toFixed(1)}%`]
      .filter(Boolean).join(" · ");
  } catch (e) { $("d-info").textContent = e.message; }
  if (state.hasTexts) {
    try {
      const { body } = await api("/api/search", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ image_id: h.id, target: "texts", k: 3 }) });
      for (const t of body.hits) {
        const li = document.createElement("li");
        li.textContent = t.text;
        const s = document.createElement("span"); s.className = "score"; s.textContent = fmt(t.rerank_score ?? t.score);
        li.append(s); $("d-caps").append(li);
      }
    } catch (e) { /* captions are optional */ }
  }
  if (!$("d-caps").children.length) $("d-caps").innerHTML = "<li>(no text corpus)</li>";
}

function closeDetail() { $("detail").hidden = true; state.detail = null; }

function setImageQuery(file, imageId, label) {
  state.file = file; state.imageId = imageId;
  $("drop-label").textContent = label || "image…";
  $("drop").classList.toggle("set", !!label);
}

function renderTerms() {
  const box = $("terms");
  box.innerHTML = "";
  const chips = [];
  if (state.file || state.imageId != null) chips.push({ label: "image: " + $("drop-label").textContent, clear: () => setImageQuery(null, null, null) });
  state.terms.forEach((t, i) => chips.push({ label: `${t.weight > 0 ? "+" : "−"} ${t.label}`, neg: t.weight < 0, clear: () => state.terms.splice(i, 1) }));
  for (const c of chips) {
    const s = document.createElement("span");
    s.className = "term" + (c.neg ? " neg" : "");
    s.textContent = c.label;
    const x = document.createElement("button"); x.textContent = "×"; x.title = "remove";
    x.addEventListener("click", () => { c.clear(); renderTerms(); search(false); });
    s.append(x); box.append(s);
  }
}

async function loadRecent() {
  try {
    const { body } = await api("/api/history?limit=12");
    const ol = $("recent"); ol.innerHTML = "";
    const seen = new Set();
    for (const s of body.searches) {
      if (!s.text || seen.has(s.text + s.target)) continue;
      seen.add(s.text + s.target);
      const li = document.createElement("li");
      li.textContent = s.text + (s.target === "texts" ? " → texts" : "");
      li.title = `${s.when} · ${s.model}`;
      li.addEventListener("click", () => {
        $("q").value = s.text;
        document.querySelector(`input[name="target"][value="${s.target}"]`).checked = true;
        setImageQuery(null, null, null); state.terms = []; renderTerms(); search(false);
      });
      ol.append(li);
    }
  } catch (e) { /* history is optional */ }
}

let jobTimer = null;
async function loadStatus() {
  try {
    const [{ body: st }, { body: jobs }] = await Promise.all([api("/api/status"), api("/api/jobs")]);
    const models = st.models.map((m) => `${m.spec}: ${m.image_vectors} img, ${m.text_vectors} txt`).join("<br>");
    $("counts").innerHTML = `${st.images} images (${st.images_failed} failed, ${st.images_pending} pending) · ${st.texts} texts · ${st.queries} searches<br>${models}`;
    state.hasTexts = st.texts > 0;
    const corp = $("f-corpus");
    if (corp.options.length === 1) for (const c of Object.keys(st.corpora)) corp.append(new Option(c, c));
    const sel = $("f-model");
    if (!sel.options.length) {
      const specs = new Set([state.model, ...st.models.map((m) => m.spec)]);
      for (const s of specs) if (s) sel.append(new Option(s, s));
      sel.value = state.model;
    }
    const job = jobs.jobs[0];
    $("job").hidden = !job;
    if (job) {
      const pct = job.total ? Math.round(100 * job.done / job.total) : 0;
      $("job-bar").style.width = (job.state === "done" ? 100 : pct) + "%";
      $("job-label").textContent = `job ${job.id} ${job.state}: ${job.done}/${job.total}` + (job.failed ? `, ${job.failed} failed` : "") +
        (job.state === "running" ? ` · ${job.rate} img/s` : "") + (job.error ? ` · ${job.error}` : "");
    }
    clearTimeout(jobTimer);
    if (job && job.state === "running") jobTimer = setTimeout(loadStatus, 1000);
  } catch (e) { $("counts").textContent = e.message; }
}

// ---------------------------------------------------------- duplicates view
// Groups from /api/duplicates (crossfind duplicates --json), side by side, with keep/skip
// marks kept in this browser (localStorage). crossfind never deletes files: the page
// only hands the list of skipped paths to the user (clipboard or a JSON download).
const DUP_PAGE = 50;
const dups = { report: null, shown: 0, marks: {}, loading: false };

function marksKey() { return "crossfind.duplicate-marks:" + (state.library || ""); }
function markId(it) { return `${it.id}:${it.path}`; }  // an id alone could come back for another file
function loadMarks() {
  try { dups.marks = JSON.parse(localStorage.getItem(marksKey()) || "{}") || {}; } catch (e) { dups.marks = {}; }
}
function saveMarks() { try { localStorage.setItem(marksKey(), JSON.stringify(dups.marks)); } catch (e) { /* private mode */ } }
function markOf(g, it) { return dups.marks[markId(it)] || (it.id === g.keep ? "keep" : "skip"); }

function fmtBytes(n) {
  if (n == null) return "?";
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

function showView(name) {
  const d = name === "duplicates";
  $("search-view").hidden = d; $("dups-view").hidden = !d;
  $("tab-search").setAttribute("aria-selected", String(!d)); $("tab-dups").setAttribute("aria-selected", String(d));
  history.replaceState(null, "", d ? "#duplicates" : location.pathname + location.search);
  if (d && !dups.report && !dups.loading) findDuplicates();
}

async function findDuplicates() {
  const params = new URLSearchParams();
  const thr = $("dups-threshold").value.trim();
  if (thr) params.set("threshold", thr);
  if ($("dups-path").value.trim()) params.set("path", $("dups-path").value.trim());
  if ($("f-model").value && $("f-model").value !== state.model) params.set("model", $("f-model").value);
  dups.loading = true;
  $("dups-summary").textContent = "looking for duplicates… (this reads the files of candidate pairs; it can take a while on a large library)";
  $("dups").innerHTML = ""; $("dups-notes").textContent = ""; $("dups-more").hidden = true;
  const t0 = performance.now();
  try {
    const { body, notes } = await api("/api/duplicates?" + params.toString());
    dups.report = body; dups.shown = 0;
    const extra = body.groups.reduce((n, g) => n + g.items.length - 1, 0);
    $("dups-summary").textContent = body.groups.length
      ? `${body.groups.length} group${body.groups.length === 1 ? "" : "s"}, ${extra} image${extra === 1 ? "" : "s"} besides the suggested ones, among ${body.images} images · ${body.model} · threshold ${body.threshold} · ${Math.round(performance.now() - t0)} ms. Suggested keep: ${body.rule}.`
      : `no duplicates among ${body.images} images · ${body.model} · threshold ${body.threshold}`;
    $("dups-notes").textContent = notes.join(" ");
    if (!thr) $("dups-threshold").placeholder = String(body.threshold);
    renderGroups();
  } catch (e) {
    dups.report = null;
    $("dups-summary").textContent = e.message;
  } finally {
    dups.loading = false;
    updateSkipped();
  }
}

function renderGroups() {
  const box = $("dups"), r = dups.report;
  const end = Math.min(r.groups.length, dups.shown + DUP_PAGE);
  for (let n = dups.shown; n < end; n++) box.append(groupEl(r.groups[n], n + 1));
  dups.shown = end;
  $("dups-more").hidden = end >= r.groups.length;
}

function groupEl(g, n) {
  const el = document.createElement("section");
  el.className = "dgroup"; el.dataset.keep = g.keep;
  const h = document.createElement("h3");
  h.textContent = `Group ${n} · ${g.items.length} images` + (g.exact ? " · exact copies" : "");
  const row = document.createElement("div");
  row.className = "drow";
  for (const it of g.items) row.append(itemEl(g, it));
  el.append(h, row);
  return el;
}

function itemEl(g, it) {
  const el = document.createElement("div");
  el.className = "ditem" + (it.id === g.keep ? " keeper" : "");
  el.dataset.id = it.id;
  const img = document.createElement("img");
  img.loading = "lazy"; img.alt = it.path; img.src = `/api/thumbs/${it.id}?size=256`; img.title = "open the original";
  img.addEventListener("click", () => window.open(`/api/files/${it.id}`, "_blank", "noopener"));
  const info = document.createElement("div");
  info.className = "info"; info.title = it.path;
  const badges = document.createElement("div");
  badges.className = "badges";
  if (it.id === g.keep) badges.append(badge("suggested keep", "keep-badge"));
  else if (it.exact) badges.append(badge("exact copy", "exact"));
  const cut = it.path.lastIndexOf("/");
  const name = document.createElement("div");
  name.className = "name"; name.textContent = it.path.slice(cut + 1);
  const folder = document.createElement("div");
  folder.className = "folder"; folder.textContent = it.path.slice(0, cut + 1);
  const dims = document.createElement("div");
  dims.textContent = [it.width ? `${it.width}×${it.height}` : "?×?", fmtBytes(it.bytes), it.date ? it.date.replace("T", " ") : "no date"].join(" · ");
  const score = document.createElement("div");
  score.className = "score";
  score.textContent = it.id === g.keep ? "kept image" : it.exact ? "byte-identical" : `similarity ${it.score.toFixed(3)}`;
  info.append(badges, name, folder, dims, score);
  const mark = document.createElement("div");
  mark.className = "mark"; mark.setAttribute("role", "group"); mark.setAttribute("aria-label", "keep or skip");
  for (const [cls, label, value] of [["m-keep", "Keep", "keep"], ["m-skip", "Skip", "skip"]]) {
    const b = document.createElement("button");
    b.type = "button"; b.className = cls; b.textContent = label;
    b.addEventListener("click", () => {
      const auto = it.id === g.keep ? "keep" : "skip";
      if (value === auto) delete dups.marks[markId(it)]; else dups.marks[markId(it)] = value;
      saveMarks(); paintMark(el, g, it); updateSkipped();
    });
    mark.append(b);
  }
  el.append(img, info, mark);
  paintMark(el, g, it);
  return el;
}

function badge(text, cls) {
  const b = document.createElement("span");
  b.className = "badge " + cls; b.textContent = text;
  return b;
}

function paintMark(el, g, it) {
  const m = markOf(g, it);
  el.classList.toggle("keep", m === "keep"); el.classList.toggle("skip", m === "skip");
  el.querySelector(".m-keep").setAttribute("aria-pressed", String(m === "keep"));
  el.querySelector(".m-skip").setAttribute("aria-pressed", String(m === "skip"));
}

function skippedPaths() {
  if (!dups.report) return [];
  return dups.report.groups.flatMap((g) => g.items.filter((it) => markOf(g, it) === "skip").map((it) => it.path));
}

function updateSkipped() {
  const paths = skippedPaths(), has = !!(dups.report && dups.report.groups.length);
  $("dups-skipped").value = paths.join("\n");
  $("dups-count").textContent = has ? `${paths.length} marked skip` : "";
  for (const id of ["dups-copy", "dups-download", "dups-reset"]) $(id).disabled = !has;
}

async function copySkipped() {
  const paths = skippedPaths();
  const text = paths.join("\n") + (paths.length ? "\n" : "");
  try {
    await navigator.clipboard.writeText(text);
    $("dups-count").textContent = `copied ${paths.length} path${paths.length === 1 ? "" : "s"}`;
  } catch (e) {  // no clipboard permission: select the list for Ctrl-C
    $("dups-skipped-box").open = true;
    $("dups-skipped").select();
    const ok = document.execCommand && document.execCommand("copy");
    $("dups-count").textContent = ok ? `copied ${paths.length} path${paths.length === 1 ? "" : "s"}` : "press Ctrl-C to copy the selected paths";
  }
}

function downloadMarks() {
  const r = dups.report;
  const out = {
    library: state.library, model: r.model, threshold: r.threshold, rule: r.rule, marked: new Date().toISOString(),
    skipped: skippedPaths(),
    groups: r.groups.map((g) => ({ keep: g.keep, exact: g.exact, items: g.items.map((it) => ({ ...it, mark: markOf(g, it) })) })),
  };
  const url = URL.createObjectURL(new Blob([JSON.stringify(out, null, 1)], { type: "application/json" }));
  const a = document.createElement("a");
  a.href = url; a.download = "crossfind-duplicates.json";
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

function bindDuplicates() {
  $("tab-search").addEventListener("click", () => showView("search"));
  $("tab-dups").addEventListener("click", () => showView("duplicates"));
  $("dups-form").addEventListener("submit", (e) => { e.preventDefault(); findDuplicates(); });
  $("dups-more").addEventListener("click", renderGroups);
  $("dups-copy").addEventListener("click", copySkipped);
  $("dups-download").addEventListener("click", downloadMarks);
  $("dups-reset").addEventListener("click", () => {
    if (!dups.report) return;
    for (const g of dups.report.groups) for (const it of g.items) delete dups.marks[markId(it)];
    saveMarks();
    for (const el of document.querySelectorAll(".ditem")) {
      const g = dups.report.groups.find((x) => x.items.some((it) => String(it.id) === el.dataset.id));
      if (g) paintMark(el, g, g.items.find((it) => String(it.id) === el.dataset.id));
    }
    updateSkipped();
  });
}

function bind() {
  bindDuplicates();
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); search(false); });
  $("more").addEventListener("click", () => { state.k += PAGE; search(true); });
  $("file").addEventListener("change", () => {
    const f = $("file").files[0];
    if (f) { setImageQuery(f, null, f.name); renderTerms(); search(false); }
  });
  const drop = $("drop");
  for (const ev of ["dragenter", "dragover"]) document.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const ev of ["dragleave", "drop"]) document.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  document.addEventListener("drop", (e) => {
    const f = e.dataTransfer && e.dataTransfer.files[0];
    if (f && f.type.startsWith("image/")) { setImageQuery(f, null, f.name); renderTerms(); search(false); }
  });
  for (const r of document.querySelectorAll('input[name="target"]')) r.addEventListener("change", () => search(false));
  $("f-threshold").addEventListener("input", () => {
    const v = parseFloat($("f-threshold").value);
    $("thr-val").textContent = v > 0 ? v.toFixed(2) : "off";
  });
  for (const id of ["f-threshold", "f-path", "f-since", "f-until", "f-corpus", "f-rerank", "f-model"]) $(id).addEventListener("change", () => search(false));
  $("close").addEventListener("click", closeDetail);
  $("detail").addEventListener("click", (e) => { if (e.target === $("detail")) closeDetail(); });
  $("d-like").addEventListener("click", () => {
    const h = state.detail; closeDetail();
    $("q").value = ""; state.terms = [];
    setImageQuery(null, h.id, h.path.split("/").pop());
    document.querySelector('input[name="target"][value="images"]').checked = true;
    renderTerms(); search(false);
  });
  for (const [id, w] of [["d-plus", 1], ["d-minus", -1]]) $(id).addEventListener("click", () => {
    const h = state.detail; closeDetail();
    state.terms.push({ weight: w, imageId: h.id, label: h.path.split("/").pop() });
    renderTerms(); search(false);
  });
  $("index-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const path = $("index-path").value.trim();
    if (!path) return;
    try {
      await api("/api/index", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ path }) });
    } catch (err) { $("counts").textContent = err.message; return; }
    loadStatus();
  });
  document.addEventListener("keydown", (e) => {
    const typing = ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName);
    if (e.key === "Escape") { closeDetail(); return; }
    if (e.key === "/" && !typing) { e.preventDefault(); showView("search"); $("q").focus(); $("q").select(); return; }
    if (!$("dups-view").hidden) return;
    if (typing || !$("detail").hidden && !["ArrowLeft", "ArrowRight"].includes(e.key)) return;
    const cols = state.target === "images" ? Math.max(1, Math.round($("grid").clientWidth / 182)) : 1;
    const moves = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: cols, ArrowUp: -cols };
    if (e.key in moves) {
      e.preventDefault();
      select(state.sel < 0 ? 0 : state.sel + moves[e.key]);
      if (!$("detail").hidden) openDetail(state.sel);
    } else if (e.key === "Enter" && state.sel >= 0) { e.preventDefault(); openDetail(state.sel); }
  });
  $("q").addEventListener("keydown", (e) => { if (e.key === "ArrowDown") { e.preventDefault(); $("q").blur(); select(0); } });
}

async function init() {
  bind();
  try {
    const { body } = await api("/api/server");
    state.model = body.model; state.library = body.library;
  } catch (e) { /* shown by status */ }
  loadMarks();
  await loadStatus();
  loadRecent();
  if (location.hash === "#duplicates") showView("duplicates"); else $("q").focus();
}
init();
