// llmuxd's status page.  Polls the control API and renders what it says.  Everything the
// daemon sends (model names, states, errors, log lines) is untrusted text: it only ever goes
// into the page as text (textContent, title, a sanitized class name), never as markup.
"use strict";

const POLL_MS = 1500;
const LOG_LINES = 60;
const TIMELINE_MIN_SECS = 60;
const TIMELINE_MAX_SECS = 900;
const TOKEN_KEY = "llmuxd-control-token";

const ui = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  canControl: false,
  logModel: null,
  busy: new Set(),  // models with a wake/sleep in flight from this page
};

// -- helpers -----------------------------------------------------------------------------------
function $(id) { return document.getElementById(id); }

function el(tag, opts, children) {
  const e = document.createElement(tag);
  if (opts) {
    if (opts.text !== undefined && opts.text !== null) e.textContent = String(opts.text);
    if (opts.cls) for (const c of [].concat(opts.cls)) e.classList.add(safeClass(c));
    if (opts.title) e.title = String(opts.title);
    if (opts.data) for (const [k, v] of Object.entries(opts.data)) e.dataset[k] = String(v);
  }
  for (const child of children || []) if (child) e.append(child);
  return e;
}

// A class name made from data: only [a-z0-9_-], so it can never be more than a class.
function safeClass(s) { return String(s).toLowerCase().replace(/[^a-z0-9_-]/g, "_").slice(0, 40) || "_"; }

function bytes(n) {
  if (n === null || n === undefined) return "?";
  const gib = n / 1024 ** 3;
  return gib >= 1 ? gib.toFixed(1) + " GiB" : (n / 1024 ** 2).toFixed(0) + " MiB";
}

function secs(v) {
  if (v === null || v === undefined || Number.isNaN(Number(v))) return "–";
  v = Number(v);
  return v < 10 ? v.toFixed(2) + " s" : v.toFixed(1) + " s";
}

function clock(unix) { return new Date(unix * 1000).toLocaleTimeString([], { hour12: false }); }

// A transition in progress as people call it: a wake by its kind, other phases by name; then its step.
function progressLabel(p) {
  return (p.phase === "wake" ? p.kind : p.phase) + (p.step ? ": " + p.step : "");
}

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function call(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (ui.token) headers["Authorization"] = "Bearer " + ui.token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body),
                                cache: "no-store", credentials: "omit" });
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) {
    const msg = data && data.error && data.error.message ? data.error.message : r.status + " " + r.statusText;
    throw new HttpError(r.status, msg);
  }
  return data;
}

function notice(text, kind) {
  const n = $("notice");
  n.textContent = text || "";
  n.hidden = !text;
  n.className = "notice " + safeClass(kind || "info");
}

// -- access ------------------------------------------------------------------------------------
async function checkAccess() {
  try {
    const a = await call("GET", "/control/access");
    ui.canControl = Boolean(a && a.control);
  } catch (e) {
    ui.canControl = false;
  }
  $("mode").textContent = ui.canControl ? "control" : "read-only";
  $("mode").className = "mode " + (ui.canControl ? "control" : "readonly");
  $("token-forget").hidden = !ui.token;
}

function useToken(token) {
  ui.token = token;
  if (token) sessionStorage.setItem(TOKEN_KEY, token); else sessionStorage.removeItem(TOKEN_KEY);
  $("token").value = "";
  checkAccess().then(refresh);
}

async function transition(verb, model) {
  ui.busy.add(model);
  notice(verb + " " + model + "…", "info");
  refresh();
  try {
    const r = await call("POST", "/control/" + verb, { model });
    notice(verb + " " + model + ": " + r.state + " in " + secs(r.duration_secs), "ok");
  } catch (e) {
    notice(verb + " " + model + " failed: " + e.message, "error");
  } finally {
    ui.busy.delete(model);
    refresh();
  }
}

// -- rendering ---------------------------------------------------------------------------------
function renderSummary(st) {
  $("active").textContent = st.active_model || "–";
  $("queue").textContent = String(st.queue_depth);
  const sw = st.switching;
  let text = "–";
  if (sw) {
    text = (sw.from || "–") + " → " + sw.to;
    const of = (name) => (name && st.models[name] ? st.models[name].progress : null);
    const p = of(sw.to) || of(sw.from);  // the wake in progress, or the eviction before it
    if (p) {
      text += " · " + progressLabel(p);
      text += " · " + secs(p.elapsed_secs) + (p.typical_secs !== null ? " of ~" + secs(p.typical_secs) : "");
    }
  }
  $("switching").textContent = text;
}

function modelCard(name, m, st, gpu) {
  const rows = [];
  const row = (k, v, cls) => rows.push(el("div", { cls: "row" }, [el("span", { text: k, cls: "k" }),
                                                               el("span", { text: v, cls: ["v", cls || "plain"] })]));
  row("eviction", m.eviction.weights + " + " + m.eviction.process);
  row("requests", m.in_flight + " in flight, " + m.waiting + " waiting");
  row("last wake", m.last_wake_kind ? m.last_wake_kind + " in " + secs(m.last_wake_secs) : "–");
  row("last sleep", m.last_sleep_secs !== null ? secs(m.last_sleep_secs) : "–");
  const p = m.progress;  // the transition in progress: phase, kind, step, elapsed and typical times
  if (p) {
    row("progress", [progressLabel(p), secs(p.elapsed_secs),
                     p.typical_secs !== null ? "typically " + secs(p.typical_secs) : null].filter(Boolean).join(" · "));
  }
  row("pids", m.pids.length ? m.pids.join(" ") : "–");
  const held = gpu && gpu.by_model ? gpu.by_model[name] : undefined;
  if (held) row("GPU memory", bytes(held));
  if (m.escalations) row("escalations", String(m.escalations), "warn");
  if (m.last_error) row("last error", m.last_error, "error");

  const head = el("div", { cls: "head" }, [
    el("span", { text: name, cls: "name" }),
    el("span", { text: m.state, cls: ["state", "state-" + m.state] }),
    st.active_model === name ? el("span", { text: "active", cls: "active-badge" }) : null,
  ]);
  const actions = [];
  if (ui.canControl) {
    const busy = ui.busy.has(name) || Boolean(st.switching);
    for (const verb of ["wake", "sleep"]) {
      const b = el("button", { text: verb, data: { action: verb, model: name } });
      b.type = "button";
      b.disabled = busy || (verb === "wake" ? m.state === "awake" : m.state !== "awake");
      b.addEventListener("click", () => transition(verb, name));
      actions.push(b);
    }
  }
  return el("div", { cls: ["card", "state-" + m.state], data: { model: name, state: m.state } },
            [head, el("div", { cls: "rows" }, rows), actions.length ? el("div", { cls: "actions" }, actions) : null]);
}

function renderModels(st, gpu) {
  $("models").replaceChildren(...Object.entries(st.models).map(([n, m]) => modelCard(n, m, st, gpu)));
}

function renderGpu(gpu) {
  const box = $("gpu");
  if (!gpu || !gpu.source || !gpu.devices.length) {
    box.replaceChildren(el("span", { text: "n/a", cls: "na", data: { gpu: "na" } }),
                        el("span", { text: " (no GPU here)", cls: "muted" }));
    return;
  }
  const items = gpu.devices.map((d) => {
    const frac = d.memory_total ? Math.min(1, (d.memory_used || 0) / d.memory_total) : 0;
    const fill = el("div", { cls: "fill" });
    fill.style.width = (frac * 100).toFixed(1) + "%";
    return el("div", { cls: "device", data: { gpu: d.index } }, [
      el("div", { text: d.index + ": " + d.name, cls: "dname" }),
      el("div", { cls: "bar" }, [fill]),
      el("div", { text: bytes(d.memory_used) + " used of " + bytes(d.memory_total) + ", " + bytes(d.memory_free) + " free",
                  cls: "dmem" }),
    ]);
  });
  items.push(el("div", { text: "source: " + gpu.source, cls: "muted" }));
  box.replaceChildren(...items);
}

function renderTimeline(st) {
  const recs = st.recent_transitions || [];
  const now = Date.now() / 1000;
  const oldest = recs.length ? Math.min(...recs.map((r) => r.started_at)) : now;
  const span = Math.min(TIMELINE_MAX_SECS, Math.max(TIMELINE_MIN_SECS, now - oldest + 5));
  const start = now - span;
  const lanes = ["switches", ...Object.keys(st.models)];
  const rows = lanes.map((lane) => {
    const track = el("div", { cls: "track" });
    for (const r of recs) {
      const inLane = lane === "switches" ? r.kind === "switch" : r.kind !== "switch" && r.model === lane;
      if (!inLane || r.started_at + r.duration_secs < start) continue;
      const left = Math.max(0, (r.started_at - start) / span);
      const width = Math.max(0.004, Math.min(1 - left, r.duration_secs / span));
      const label = r.kind === "switch" ? (r.from_model || "–") + " → " + r.model : r.kind;
      const block = el("div", {
        cls: ["block", "kind-" + r.kind, r.ok ? "ok" : "failed"],
        title: label + " · " + secs(r.duration_secs) + " · " + clock(r.started_at) + (r.ok ? "" : " · failed"),
        data: { kind: r.kind, model: r.model },
      });
      block.style.left = (left * 100).toFixed(2) + "%";
      block.style.width = (width * 100).toFixed(2) + "%";
      track.append(block);
    }
    return el("div", { cls: "lane", data: { lane } }, [el("span", { text: lane, cls: "lane-name" }), track]);
  });
  const axis = el("div", { cls: "axis" }, [el("span", { text: "−" + Math.round(span) + " s" }), el("span", { text: "now" })]);
  $("timeline").replaceChildren(...rows, axis);

  const body = $("transitions").tBodies[0];
  body.replaceChildren(...recs.slice(-12).reverse().map((r) => el("tr", { cls: r.ok ? "ok" : "failed", data: { kind: r.kind } }, [
    el("td", { text: clock(r.started_at) }),
    el("td", {}, [el("span", { text: r.kind, cls: ["kind", "kind-" + r.kind] })]),
    el("td", { text: r.kind === "switch" ? (r.from_model || "–") + " → " + r.model : r.model }),
    el("td", { text: secs(r.duration_secs) }),
    el("td", { text: r.ok ? (r.state || "ok") : "failed" + (r.state ? " (" + r.state + ")" : "") }),
  ])));
}

function renderLogTabs(names) {
  if (!ui.logModel || !names.includes(ui.logModel)) ui.logModel = names[0] || null;
  $("log-tabs").replaceChildren(...names.map((n) => {
    const b = el("button", { text: n, cls: n === ui.logModel ? ["tab", "selected"] : "tab", data: { model: n } });
    b.type = "button";
    b.setAttribute("role", "tab");
    b.addEventListener("click", () => { ui.logModel = n; refresh(); });
    return b;
  }));
}

function renderLog(tail) {
  const pre = $("log");
  const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 8;
  pre.dataset.model = tail.model;
  pre.textContent = tail.lines.length ? tail.lines.join("\n") : "(no output yet)";
  if (atBottom) pre.scrollTop = pre.scrollHeight;
}

// -- polling -----------------------------------------------------------------------------------
let timer = null;
let running = false;

async function refresh() {
  if (running) return;
  running = true;
  clearTimeout(timer);
  try {
    const [st, gpu] = await Promise.all([call("GET", "/control/status"), call("GET", "/control/gpu").catch(() => null)]);
    renderSummary(st);
    renderGpu(gpu);
    renderModels(st, gpu);
    renderTimeline(st);
    renderLogTabs(Object.keys(st.models));
    if (ui.logModel) {
      renderLog(await call("GET", "/control/models/" + encodeURIComponent(ui.logModel) + "/log?lines=" + LOG_LINES));
    }
    $("conn").textContent = "live";
    $("conn").className = "conn live";
    document.body.dataset.loaded = "1";
  } catch (e) {
    $("conn").textContent = e instanceof HttpError ? e.message : "daemon unreachable";
    $("conn").className = "conn down";
    if (e instanceof HttpError && (e.status === 401 || e.status === 403)) {
      $("models").replaceChildren(el("p", { text: e.status === 401 ? "The control token was refused."
        : "This page needs the control token here (the control API answers loopback peers only).", cls: "muted" }));
    }
  } finally {
    running = false;
    timer = setTimeout(refresh, POLL_MS);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    useToken($("token").value.trim());
  });
  $("token-forget").addEventListener("click", () => useToken(""));
  checkAccess().then(refresh);
});
