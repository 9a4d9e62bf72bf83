"use strict";
// envoy-docker dashboard. Every value from the API reaches the DOM as text
// only (textContent, text nodes, setAttribute on non-URL attributes).
(() => {
  const DASH = "\u2013";
  const SVGNS = "http://www.w3.org/2000/svg";
  const AUTH_MSG = "this registrar needs its admin token (the browser asks for it; reload)";
  const $ = (id) => document.getElementById(id);
  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  const str = (v) => (v === null || v === undefined || v === "" ? DASH : String(v));

  // el("td", {class: "x", title: "y"}, "text", childNode): strings become text nodes.
  function el(tag, props, ...kids) {
    const e = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (v === null || v === undefined || v === false) continue;
        if (k === "class") e.className = v;
        else e.setAttribute(k, String(v));
      }
    }
    for (const k of kids) if (k !== null && k !== undefined) e.append(k);
    return e;
  }
  function badge(text, tone, title) {
    return el("span", { class: "badge " + tone, title: title || null }, text);
  }
  // The only place an href is built: a fixed prefix and an encoded id.
  function mappingLink(id, text) {
    const a = document.createElement("a");
    a.setAttribute("href", "#/mapping/" + encodeURIComponent(String(id)));
    a.textContent = text === undefined ? String(id) : text;
    return a;
  }

  // ---- fetching ----
  class HttpError extends Error {
    constructor(status, msg) { super(msg); this.status = status; }
  }
  function setAuth(show) {
    const b = $("auth");
    if (show) b.textContent = AUTH_MSG;
    b.hidden = !show;
  }
  async function getJSON(path) {
    let r;
    try {
      r = await fetch(path, { credentials: "same-origin", cache: "no-store" });
    } catch (e) {
      throw new HttpError(0, "registrar unreachable (" + e.message + ")");
    }
    if (r.status === 401) { setAuth(true); throw new HttpError(401, AUTH_MSG); }
    setAuth(false);
    if (!r.ok) throw new HttpError(r.status, "HTTP " + r.status + (r.statusText ? " " + r.statusText : ""));
    try { return await r.json(); } catch (e) { throw new HttpError(r.status, "unreadable answer: " + e.message); }
  }

  // ---- time and number formatting ----
  let clockSkew = 0; // server clock minus ours, from mappings' now_ms
  const nowMs = () => Date.now() + clockSkew;
  const pad = (n) => String(n).padStart(2, "0");
  function hms(ms) {
    const d = new Date(ms);
    return pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }
  function absTime(ms) {
    if (!isNum(ms)) return DASH;
    const d = new Date(ms);
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " + hms(ms);
  }
  function dur(secs) { // "1h 10m", "5m 3s", "45s", "2d 4h"
    secs = Math.max(0, Math.floor(secs));
    const d = Math.floor(secs / 86400), h = Math.floor((secs % 86400) / 3600);
    const m = Math.floor((secs % 3600) / 60), s = secs % 60;
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + m + "m";
    if (m) return m + "m " + s + "s";
    return s + "s";
  }
  function ago(ms) { // coarse, so that it changes seldom: "12s ago", "5m ago"
    if (!isNum(ms)) return DASH;
    const s = Math.max(0, Math.floor((nowMs() - ms) / 1000));
    if (s < 60) return s + "s ago";
    if (s < 3600) return Math.floor(s / 60) + "m ago";
    return dur(s) + " ago";
  }
  function fmtNum(v) { // plain decimal, no units: "12.5", "0", "0.25", "340"
    if (!isNum(v)) return DASH;
    if (v === 0) return "0";
    const a = Math.abs(v);
    const s = a >= 100 ? v.toFixed(0) : a >= 1 ? v.toFixed(1) : v.toFixed(2);
    return s.includes(".") ? s.replace(/\.?0+$/, "") : s;
  }
  const fmtInt = (v) => (isNum(v) ? String(Math.round(v)) : DASH);
  const BYTE_UNITS = ["B/s", "kB/s", "MB/s", "GB/s", "TB/s"];
  function fmtBytes(v) {
    if (!isNum(v)) return DASH;
    let i = 0;
    while (Math.abs(v) >= 1000 && i < BYTE_UNITS.length - 1) { v /= 1000; i++; }
    const n = i === 0 ? String(Math.round(v)) : Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(1);
    return n + " " + BYTE_UNITS[i];
  }
  function fmtLat(p50, p99) {
    if (!isNum(p50) && !isNum(p99)) return DASH;
    return fmtNum(p50) + " / " + fmtNum(p99);
  }

  // Replace a container's children only when the data behind them changed.
  const built = new WeakMap();
  function fill(node, data, build) {
    const key = JSON.stringify(data);
    if (built.get(node) === key) return false;
    built.set(node, key);
    node.replaceChildren(...[].concat(build(data)));
    return true;
  }
  function setPre(pre, value) {
    const s = value === null || value === undefined ? "(Envoy does not hold it)" : JSON.stringify(value, null, 2);
    if (pre.textContent !== s) pre.textContent = s;
  }
  function table(cls, heads, rows) {
    const thead = el("thead", null, el("tr", null, ...heads.map((h) => el("th", { class: h.cls || null }, h.label || h))));
    const tbody = el("tbody");
    for (const cells of rows) tbody.append(el("tr", null, ...cells));
    return el("div", { class: "table-wrap short" }, el("table", { class: "grid " + cls }, thead, tbody));
  }

  // ---- served by ----
  function servedOf(m) {
    if (m.state === "failed") return { text: "failed", tone: "red" };
    switch (m.served_by) {
      case "envoy": return { text: "Envoy", tone: "green" };
      case "relay": return { text: "relay", tone: "amber" };
      case "handover": return { text: "handover", tone: "grey" };
      default: return { text: str(m.served_by), tone: "grey" };
    }
  }

  // ---- main view: the mappings table ----
  const live = (m, k) => (m.live && isNum(m.live[k]) ? m.live[k] : null);
  const COLS = [
    { k: "proto", label: "proto", sort: (m) => m.proto },
    { k: "host", label: "host", sort: (m) => m.host },
    { k: "container", label: "container", sort: (m) => m.container_name || m.container_id },
    { k: "image", label: "image", sort: (m) => m.image },
    { k: "service", label: "service", sort: (m) => m.service },
    { k: "mode", label: "mode", sort: (m) => m.mode },
    { k: "served", label: "served by", sort: (m) => servedOf(m).text },
    { k: "cx", label: "conns", num: true, title: "connections open now", sort: (m) => live(m, "cx_active") },
    { k: "cxs", label: "new conn/s", num: true, sort: (m) => live(m, "cx_per_s") },
    { k: "rqs", label: "req/s", num: true, sort: (m) => live(m, "rq_per_s") },
    { k: "2xx", label: "2xx/s", num: true, sort: (m) => live(m, "rq_2xx_per_s") },
    { k: "4xx", label: "4xx/s", num: true, sort: (m) => live(m, "rq_4xx_per_s") },
    { k: "5xx", label: "5xx/s", num: true, sort: (m) => live(m, "rq_5xx_per_s") },
    { k: "rx", label: "in B/s", num: true, title: "bytes per second from clients", sort: (m) => live(m, "rx_bytes_per_s") },
    { k: "tx", label: "out B/s", num: true, title: "bytes per second to clients", sort: (m) => live(m, "tx_bytes_per_s") },
    { k: "lat", label: "p50/p99 ms", num: true, title: "sorts by p99", sort: (m) => live(m, "p99_ms") },
    { k: "spark", label: "last 5 min", title: "requests/s (TCP: new connections/s)", sort: null },
  ];
  const sortState = { key: null, dir: 1 };
  const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });
  const rows = new Map(); // mapping id -> row record
  let mapList = [];
  let orderKey = "";
  let renderCount = 0;
  let lastOkAt = null;
  const summaryParts = {};

  function buildHead() {
    const tr = $("mappings-head");
    for (const c of COLS) {
      const th = el("th", { class: "c-" + c.k + (c.num ? " n" : ""), title: c.title || null, scope: "col" });
      if (c.sort) {
        const b = el("button", { type: "button", class: "sort" }, c.label);
        b.addEventListener("click", () => {
          if (sortState.key === c.k) sortState.dir = -sortState.dir;
          else { sortState.key = c.k; sortState.dir = 1; }
          for (const other of tr.children) { other.classList.remove("sort-asc", "sort-desc"); other.removeAttribute("aria-sort"); }
          th.classList.add(sortState.dir > 0 ? "sort-asc" : "sort-desc");
          th.setAttribute("aria-sort", sortState.dir > 0 ? "ascending" : "descending");
          renderMappings();
        });
        th.append(b);
      } else th.append(c.label);
      tr.append(th);
    }
    const s = $("summary");
    const part = (k, cls, label) => {
      summaryParts[k] = el("b", null, "0");
      const span = el("span", { class: "s-" + k + (cls ? " " + cls : "") }, summaryParts[k], label);
      span.hidden = k === "handover" || k === "shown";
      s.append(span);
    };
    part("total", "", " mappings");
    part("envoy", "badge green", " Envoy");
    part("relay", "badge amber", " relay");
    part("failed", "badge red", " failed");
    part("handover", "badge grey", " handover");
    part("shown", "muted", " shown");
  }

  function makeRow(id) {
    const tr = document.createElement("tr");
    tr.setAttribute("data-id", id);
    const r = { tr, td: {}, prev: Object.create(null), sparkKey: null, hay: "" };
    for (const c of COLS) {
      const td = document.createElement("td");
      td.className = "c-" + c.k + (c.num ? " n" : "");
      tr.append(td);
      r.td[c.k] = td;
    }
    r.link = mappingLink(id, "");
    r.cid = el("span", { class: "cid" });
    r.td.container.append(r.link, " ", r.cid);
    r.badge = el("span", { class: "badge" });
    r.since = el("span", { class: "since" });
    r.td.served.append(r.badge, " ", r.since);
    r.rq = el("span", { class: "num" });
    r.td.rqs.append(r.rq);
    r.svg = document.createElementNS(SVGNS, "svg");
    r.svg.setAttribute("class", "spark");
    r.svg.setAttribute("width", "100");
    r.svg.setAttribute("height", "20");
    r.svg.setAttribute("viewBox", "0 0 100 20");
    r.svg.setAttribute("aria-hidden", "true");
    r.poly = document.createElementNS(SVGNS, "polyline");
    r.svg.append(r.poly);
    r.td.spark.append(r.svg);
    return r;
  }
  // Write only what changed since the last tick.
  function setT(r, k, node, s) {
    if (r.prev[k] !== s) { r.prev[k] = s; node.textContent = s; }
  }
  function setAttr(r, k, node, attr, s) {
    if (r.prev[k] === s) return;
    r.prev[k] = s;
    if (s === null) node.removeAttribute(attr); else node.setAttribute(attr, s);
  }
  function updateRow(r, m) {
    const td = r.td;
    r.hay = [m.container_name, m.service, m.name, m.image, m.host]
      .map((v) => (v === null || v === undefined ? "" : String(v))).join("\u0000").toLowerCase();
    setT(r, "proto", td.proto, str(m.proto));
    setT(r, "host", td.host, str(m.host));
    setT(r, "name", r.link, m.container_name ? String(m.container_name) : m.container_id ? String(m.container_id).slice(0, 12) : DASH);
    setT(r, "cid", r.cid, m.container_name && m.container_id ? String(m.container_id).slice(0, 12) : "");
    setT(r, "image", td.image, str(m.image));
    setAttr(r, "imageT", td.image, "title", m.image ? String(m.image) : null);
    setT(r, "service", td.service, str(m.service));
    setAttr(r, "serviceT", td.service, "title", m.name ? "name in Envoy: " + m.name : null);
    setT(r, "mode", td.mode, str(m.mode));
    const sv = servedOf(m);
    setT(r, "served", r.badge, sv.text);
    setAttr(r, "servedC", r.badge, "class", "badge " + sv.tone);
    setAttr(r, "err", r.badge, "title", m.error ? String(m.error) : null);
    setT(r, "since", r.since, isNum(m.since_ms) ? ago(m.since_ms) : "");
    setAttr(r, "sinceT", r.since, "title", isNum(m.since_ms) ? absTime(m.since_ms) : null);
    setAttr(r, "rowC", r.tr, "class", m.state === "failed" ? "row-failed" : null);
    setT(r, "cx", td.cx, fmtInt(live(m, "cx_active")));
    setT(r, "cxs", td.cxs, fmtNum(live(m, "cx_per_s")));
    setT(r, "rqs", r.rq, fmtNum(live(m, "rq_per_s")));
    setT(r, "2xx", td["2xx"], fmtNum(live(m, "rq_2xx_per_s")));
    setT(r, "4xx", td["4xx"], fmtNum(live(m, "rq_4xx_per_s")));
    setT(r, "5xx", td["5xx"], fmtNum(live(m, "rq_5xx_per_s")));
    setT(r, "rx", td.rx, fmtBytes(live(m, "rx_bytes_per_s")));
    setT(r, "tx", td.tx, fmtBytes(live(m, "tx_bytes_per_s")));
    setT(r, "lat", td.lat, fmtLat(live(m, "p50_ms"), live(m, "p99_ms")));
    updateSpark(r, m.live && Array.isArray(m.live.history) ? m.live.history : null);
  }
  function updateSpark(r, h) {
    const key = h && h.length ? h.length + "|" + h[0] + "|" + h[h.length - 1] : "none";
    if (key === r.sparkKey) return;
    r.sparkKey = key;
    if (key === "none") {
      r.poly.setAttribute("points", "");
      setAttr(r, "sparkT", r.td.spark, "title", null);
      return;
    }
    let max = 0;
    for (const v of h) if (isNum(v) && v > max) max = v;
    const n = h.length;
    const step = 100 / Math.max(59, n - 1); // 60 points across; fewer start from the right
    const pts = new Array(n);
    for (let i = 0; i < n; i++) {
      const v = isNum(h[i]) ? h[i] : 0;
      const x = 100 - (n - 1 - i) * step;
      const y = max > 0 ? 19 - (v / max) * 18 : 19;
      pts[i] = x.toFixed(1) + "," + y.toFixed(1);
    }
    r.poly.setAttribute("points", pts.join(" "));
    setAttr(r, "sparkT", r.td.spark, "title", "peak " + fmtNum(max) + "/s, now " + fmtNum(h[n - 1]) + "/s");
  }
  function sorted(list) {
    const col = COLS.find((c) => c.k === sortState.key);
    if (!col || !col.sort) return list;
    const dir = sortState.dir;
    const keyed = list.map((m, i) => {
      const v = col.sort(m);
      return { m, i, v: v === undefined || v === "" ? null : v };
    });
    keyed.sort((a, b) => {
      if (a.v === null || b.v === null) {
        if (a.v === b.v) return a.i - b.i;
        return a.v === null ? 1 : -1; // empty values last either way
      }
      const c = typeof a.v === "number" && typeof b.v === "number" ? a.v - b.v : collator.compare(String(a.v), String(b.v));
      return c * dir || a.i - b.i;
    });
    return keyed.map((k) => k.m);
  }
  // Put rows in the wanted order with as few moves as possible: the rows
  // that form the longest run already in order stay, the others move.
  function place(tbody, trs) {
    const pos = new Map();
    let i = 0;
    for (let n = tbody.firstChild; n; n = n.nextSibling) pos.set(n, i++);
    const want = new Set(trs);
    for (const n of pos.keys()) if (!want.has(n)) n.remove();
    const seq = trs.map((tr) => (pos.has(tr) ? pos.get(tr) : -1));
    const prev = new Int32Array(seq.length), tails = [];
    for (let j = 0; j < seq.length; j++) {
      const v = seq[j];
      if (v < 0) continue;
      let lo = 0, hi = tails.length;
      while (lo < hi) { const mid = (lo + hi) >> 1; if (seq[tails[mid]] < v) lo = mid + 1; else hi = mid; }
      prev[j] = lo > 0 ? tails[lo - 1] : -1;
      tails[lo] = j;
    }
    const keep = new Uint8Array(seq.length);
    for (let k = tails.length ? tails[tails.length - 1] : -1; k >= 0; k = prev[k]) keep[k] = 1;
    let next = null;
    for (let j = trs.length - 1; j >= 0; j--) {
      if (!keep[j]) tbody.insertBefore(trs[j], next);
      next = trs[j];
    }
  }
  function renderMappings() {
    const t0 = performance.now();
    const q = $("filter").value.trim().toLowerCase();
    const seen = new Set();
    const visible = [];
    const counts = { envoy: 0, relay: 0, failed: 0, handover: 0 };
    for (const m of mapList) {
      if (!m || typeof m.id !== "string" || seen.has(m.id)) continue;
      seen.add(m.id);
      let r = rows.get(m.id);
      if (!r) { r = makeRow(m.id); rows.set(m.id, r); }
      updateRow(r, m);
      if (m.state === "failed") counts.failed++;
      else if (m.served_by in counts) counts[m.served_by]++;
      if (!q || r.hay.includes(q)) visible.push(m);
    }
    for (const [id, r] of rows) if (!seen.has(id)) { r.tr.remove(); rows.delete(id); }
    const ordered = sorted(visible);
    const key = ordered.map((m) => m.id).join("\n");
    if (key !== orderKey) {
      orderKey = key;
      place($("mappings-body"), ordered.map((m) => rows.get(m.id).tr));
    }
    const setPart = (k, n, show) => {
      const s = String(n);
      if (summaryParts[k].textContent !== s) summaryParts[k].textContent = s;
      summaryParts[k].parentNode.hidden = !show;
    };
    setPart("total", seen.size, true);
    setPart("envoy", counts.envoy, true);
    setPart("relay", counts.relay, true);
    setPart("failed", counts.failed, true);
    setPart("handover", counts.handover, counts.handover > 0);
    setPart("shown", visible.length, !!q);
    const empty = $("mappings-empty");
    const emptyText = seen.size === 0 ? "no published ports yet" : visible.length === 0 ? "no mapping matches the filter" : "";
    if (empty.textContent !== emptyText) empty.textContent = emptyText;
    empty.hidden = !emptyText;
    const ms = performance.now() - t0;
    renderCount++;
    document.body.dataset.rendered = String(renderCount);
    document.body.dataset.renderMs = String(Math.round(ms * 10) / 10);
  }
  function setStatus(node, okAt, err) {
    let s = okAt === null ? "" : "updated " + hms(okAt);
    if (err) s = (s ? s + "; " : "") + "fetch failed at " + hms(Date.now()) + ": " + err + (okAt === null ? "" : " (showing the last data)");
    if (node.textContent !== s) node.textContent = s;
    node.classList.toggle("error", !!err);
  }
  async function tickMappings() {
    try {
      const d = await getJSON("/api/v1/mappings");
      if (isNum(d.now_ms)) clockSkew = d.now_ms - Date.now();
      mapList = Array.isArray(d.mappings) ? d.mappings : [];
      lastOkAt = Date.now();
      renderMappings();
      setStatus($("updated"), lastOkAt, null);
    } catch (e) {
      setStatus($("updated"), lastOkAt, e.message);
    }
  }

  // ---- events (shared by the events view and the mapping view) ----
  const KINDS = {
    register: "green", remove: "grey", handover: "amber", takeback: "green",
    nack: "red", envoy: "blue", docker: "blue", etcd: "violet",
  };
  function eventsTable(events, withMapping) {
    if (!events.length) return el("p", { class: "empty" }, "no events yet");
    const heads = [{ label: "time", cls: "c-time" }, { label: "kind", cls: "c-kind" }];
    if (withMapping) heads.push({ label: "mapping", cls: "c-mapping" });
    heads.push({ label: "text", cls: "c-text" });
    const list = events.slice().sort((a, b) => (b.at_ms || 0) - (a.at_ms || 0));
    return table("events", heads, list.map((ev) => {
      const kind = String(ev.kind);
      const cells = [
        el("td", { class: "c-time", title: absTime(ev.at_ms) },
          isNum(ev.at_ms) ? hms(ev.at_ms) : DASH, " ",
          el("span", { class: "rel muted", "data-at": isNum(ev.at_ms) ? ev.at_ms : null }, ago(ev.at_ms))),
        el("td", { class: "c-kind" }, badge(kind, KINDS[kind] || "grey")),
      ];
      if (withMapping) {
        cells.push(el("td", { class: "c-mapping" }, ev.mapping === null || ev.mapping === undefined ? DASH : mappingLink(ev.mapping)));
      }
      cells.push(el("td", { class: "c-text wrap" }, str(ev.text)));
      return cells;
    }));
  }
  function refreshAgo(root) {
    for (const s of root.querySelectorAll("[data-at]")) {
      const t = ago(Number(s.getAttribute("data-at")));
      if (s.textContent !== t) s.textContent = t;
    }
  }
  function viewShell(box, title) {
    const status = el("div", { class: "status" });
    const content = el("div", { class: "content" });
    box.replaceChildren(el("div", { class: "toolbar" }, el("h2", null, title), status), content);
    return { status, content };
  }

  // ---- mapping view ----
  function mappingView(box, id) {
    const shell = viewShell(box, "");
    const h2 = box.querySelector("h2");
    h2.append("mapping ", el("code", null, id), " ");
    const headBadge = el("span");
    h2.append(headBadge);
    box.querySelector(".toolbar").prepend(el("a", { class: "back", href: "#/" }, "\u2190 all mappings"));
    const fields = el("dl", { id: "mapping-fields", class: "fields" });
    const labels = el("div", { id: "mapping-labels" });
    const envErr = el("div", { id: "mapping-envoy-error" });
    const pres = {};
    const envoyBox = el("section", { class: "card" }, el("h3", null, "Envoy"), envErr);
    for (const k of ["listener", "cluster", "endpoints"]) {
      pres[k] = el("pre", { id: "mapping-" + k, class: "json" });
      envoyBox.append(el("h4", null, k), pres[k]);
    }
    const events = el("div", { id: "mapping-events" });
    const missing = el("p", { id: "mapping-missing", class: "empty big", hidden: "" }, "no such mapping (it may have stopped)");
    const body = el("div", { class: "cards" },
      el("section", { class: "card" }, el("h3", null, "Mapping"), fields),
      el("section", { class: "card" }, el("h3", null, "Labels"), labels),
      envoyBox,
      el("section", { class: "card wide" }, el("h3", null, "Events"), events));
    shell.content.append(missing, body);
    let okAt = null;
    return async (isCurrent) => {
      let d;
      try {
        d = await getJSON("/api/v1/mappings/" + encodeURIComponent(id));
      } catch (e) {
        if (!isCurrent()) return;
        if (e.status === 404) { missing.hidden = false; body.hidden = true; headBadge.replaceChildren(); setStatus(shell.status, Date.now(), null); }
        else setStatus(shell.status, okAt, e.message);
        return;
      }
      if (!isCurrent()) return;
      okAt = Date.now();
      missing.hidden = true;
      body.hidden = false;
      const m = d.mapping || {};
      const sv = servedOf(m);
      const err = m.error ? String(m.error) : null;
      fill(headBadge, [sv, err], () => badge(sv.text, sv.tone, err));
      const lv = m.live || {};
      const pairs = [
        ["id", m.id], ["proto", m.proto], ["host", m.host], ["backend", m.backend],
        ["container", m.container_name], ["container id", m.container_id], ["image", m.image],
        ["service", m.service], ["name in Envoy", m.name], ["mode", m.mode], ["state", m.state],
        ["served by", sv.text], ["since", isNum(m.since_ms) ? absTime(m.since_ms) + " (" + ago(m.since_ms) + ")" : null],
        ["error", m.error], ["owner pid", d.owner_pid],
        ["conns now", fmtInt(lv.cx_active)], ["new conn/s", fmtNum(lv.cx_per_s)], ["req/s", fmtNum(lv.rq_per_s)],
        ["2xx / 4xx / 5xx per s", [lv.rq_2xx_per_s, lv.rq_4xx_per_s, lv.rq_5xx_per_s].map(fmtNum).join(" / ")],
        ["in / out", fmtBytes(lv.rx_bytes_per_s) + " / " + fmtBytes(lv.tx_bytes_per_s)],
        ["p50 / p99 ms", fmtLat(lv.p50_ms, lv.p99_ms)],
      ];
      const known = new Set(["id", "proto", "host", "backend", "container_name", "container_id", "image", "service",
        "name", "mode", "state", "served_by", "since_ms", "error", "live"]);
      for (const [k, v] of Object.entries(m)) if (!known.has(k)) pairs.push([k, typeof v === "object" && v !== null ? JSON.stringify(v) : v]);
      fill(fields, pairs, () => pairs.flatMap(([k, v]) => [el("dt", null, k), el("dd", { class: k === "error" && v ? "error" : null }, str(v))]));
      const lab = d.labels && typeof d.labels === "object" ? Object.entries(d.labels) : [];
      lab.sort((a, b) => collator.compare(a[0], b[0]));
      fill(labels, lab, () => (lab.length
        ? table("labels", ["key", "value"], lab.map(([k, v]) => [el("td", { class: "k" }, k), el("td", { class: "wrap" }, str(v))]))
        : el("p", { class: "empty" }, "no labels")));
      const env = d.envoy || {};
      fill(envErr, env.error || null, (e) => (e ? el("p", { class: "error" }, "Envoy's admin: " + e) : []));
      for (const k of Object.keys(pres)) setPre(pres[k], env[k]);
      fill(events, d.events || [], (evs) => eventsTable(evs, false));
      refreshAgo(events);
      setStatus(shell.status, okAt, null);
    };
  }

  // ---- fleet view ----
  function fleetView(box) {
    const shell = viewShell(box, "Fleet");
    let okAt = null;
    return async (isCurrent) => {
      let d;
      try { d = await getJSON("/api/v1/fleet"); } catch (e) {
        if (isCurrent()) setStatus(shell.status, okAt, e.message);
        return;
      }
      if (!isCurrent()) return;
      okAt = Date.now();
      setStatus(shell.status, okAt, null);
      fill(shell.content, d, buildFleet);
    };
  }
  function buildFleet(d) {
    if (!d.enabled) return el("p", { id: "fleet-off", class: "empty big" }, "this host is not in a fleet (serve --catalog)");
    const out = [el("dl", { class: "fields", id: "fleet-head" },
      el("dt", null, "this host"), el("dd", null, str(d.host_id)),
      el("dt", null, "etcd"), el("dd", { id: "fleet-etcd" }, str(d.etcd)))];
    const services = Array.isArray(d.services) ? d.services : [];
    if (!services.length) out.push(el("p", { class: "empty" }, "no service in the catalog"));
    for (const s of services) {
      const inst = Array.isArray(s.instances) ? s.instances : [];
      out.push(el("section", { class: "card wide service", "data-service": str(s.service) },
        el("h3", null, "service ", el("code", null, str(s.service)), " ",
          el("span", { class: "muted" }, inst.length + (inst.length === 1 ? " instance" : " instances"))),
        table("instances", ["host id", "address", "health", "mode", "container", ""], inst.map((i) => [
          el("td", null, str(i.host_id)),
          el("td", null, str(i.address)),
          el("td", null, badge(str(i.health), i.health === "Healthy" ? "green" : "amber")),
          el("td", null, str(i.mode)),
          el("td", null, str(i.container)),
          el("td", null, i.local ? badge("this host", "blue") : ""),
        ]))));
    }
    const egress = Array.isArray(d.egress) ? d.egress : [];
    out.push(el("section", { class: "card wide", id: "fleet-egress" }, el("h3", null, "Egress listeners"),
      egress.length
        ? table("egress", ["service", { label: "port", cls: "n" }, "listen", { label: "endpoints", cls: "n" }], egress.map((e) => [
          el("td", null, str(e.service)), el("td", { class: "n" }, str(e.port)),
          el("td", null, str(e.listen)), el("td", { class: "n" }, str(e.endpoints))]))
        : el("p", { class: "empty" }, "no egress listener")));
    if (d.mesh && typeof d.mesh === "object") out.push(...buildMesh(d.mesh));
    return out;
  }
  function expiresIn(s) {
    if (!isNum(s) || s <= 0) return "expired";
    if (s < 120) return s + " s";
    if (s < 7200) return Math.round(s / 60) + " min";
    return Math.round(s / 3600) + " h";
  }
  function buildMesh(m) {
    const ids = Array.isArray(m.identities) ? m.identities : [];
    const calls = Array.isArray(m.calls) ? m.calls : [];
    const n = (v) => el("td", { class: "n" }, str(v));
    return [
      el("section", { class: "card wide", id: "mesh-identities" }, el("h3", null, "Mesh identities"),
        ids.length
          ? table("mesh-identities", ["identity", { label: "expires in", cls: "n" }, { label: "leaves issued", cls: "n" }], ids.map((i) => [
            el("td", null, el("code", null, str(i.identity))), el("td", { class: "n" }, expiresIn(i.expires_in_s)), n(i.issued)]))
          : el("p", { class: "empty" }, "no identity yet")),
      el("section", { class: "card wide", id: "mesh-calls" }, el("h3", null, "Calls to this host's mesh port"),
        calls.length
          ? table("mesh-calls", ["service", "caller", { label: "handshakes", cls: "n" }, { label: "failed", cls: "n" }, { label: "denied", cls: "n" }], calls.map((c) => [
            el("td", null, str(c.service)), el("td", null, el("code", null, str(c.caller))),
            n(c.handshakes), n(c.failed), el("td", { class: "n" }, c.denied > 0 ? badge(str(c.denied), "amber") : "0")]))
          : el("p", { class: "empty" }, "no call yet")),
    ];
  }

  // ---- events view ----
  function eventsView(box) {
    const shell = viewShell(box, "Events");
    let okAt = null;
    return async (isCurrent) => {
      let d;
      try { d = await getJSON("/api/v1/events"); } catch (e) {
        if (isCurrent()) setStatus(shell.status, okAt, e.message);
        return;
      }
      if (!isCurrent()) return;
      okAt = Date.now();
      setStatus(shell.status, okAt, null);
      fill(shell.content, Array.isArray(d.events) ? d.events : [], (evs) => eventsTable(evs, true));
      refreshAgo(shell.content);
    };
  }

  // ---- overview strip ----
  async function tickOverview() {
    const box = $("overview");
    let d;
    try { d = await getJSON("/api/v1/overview"); } catch (e) {
      const text = e.status === 401 ? "admin token needed" : e.status ? "overview: " + e.message : "registrar unreachable";
      box.replaceChildren(badge(text, "red", e.message));
      return;
    }
    const b = [];
    const item = (cls, node) => { node.classList.add("ov-" + cls); b.push(node); };
    item("host", el("span", { class: "ov-text", title: "host id" }, str(d.host_id)));
    item("version", el("span", { class: "ov-text muted" }, "v" + str(d.version)));
    item("uptime", el("span", { class: "ov-text muted", title: "uptime" }, "up " + (isNum(d.uptime_secs) ? dur(d.uptime_secs) : DASH)));
    if (d.serving === false) item("serving", badge("not serving", "red"));
    const conn = isNum(d.envoys_connected) ? d.envoys_connected : 0;
    const lag = isNum(d.envoys_lagging) ? d.envoys_lagging : 0;
    const envs = Array.isArray(d.envoys) ? d.envoys : [];
    const ads = [...new Set(envs.map((e) => e && e.ads).filter(Boolean))].join("+");
    const lagging = envs.filter((e) => e && isNum(e.stalled_secs)).map((e) => "stream " + e.stream + " stalled " + dur(e.stalled_secs));
    item("envoys", badge("Envoys " + conn + (lag ? ", " + lag + " lagging" : "") + (ads ? " \u00b7 ADS " + ads : ""),
      conn === 0 ? "red" : lag ? "amber" : "green", lagging.join("; ") || null));
    const ports = d.ports || {};
    item("ports", badge(ports.claimed ? "ports claimed in nftables" : "ports reached by Docker's DNAT",
      ports.claimed ? "green" : "amber", ports.detail ? String(ports.detail) : null));
    const dk = d.docker || {};
    const dkText = dk.reachable === true ? "Docker ok" : dk.reachable === false ? "Docker unreachable" : "Docker not heard from";
    const dkTone = dk.reachable === true ? "green" : dk.reachable === false ? "red" : "grey";
    item("docker", badge(dkText, dkTone, dk.detail ? String(dk.detail) : null));
    if (!d.fleet) item("fleet", badge("fleet off", "grey"));
    else {
      const f = d.fleet;
      item("fleet", badge("etcd " + (f.etcd_ok ? "ok" : "down") + (isNum(f.instances) ? " \u00b7 " + f.instances + " instances" : ""),
        f.etcd_ok ? "green" : "red", str(f.etcd)));
    }
    const st = d.stats || {};
    const where = st.envoy_admin ? "Envoy admin " + st.envoy_admin : null;
    if (st.ok === false) item("stats", badge("stats error", "red", (st.error ? String(st.error) : "error") + (where ? " (" + where + ")" : "")));
    else if (!isNum(st.age_ms)) item("stats", badge("stats: no reading yet", "grey", where));
    else item("stats", badge("stats " + (st.age_ms < 5000 ? "ok" : dur(st.age_ms / 1000) + " old"), st.age_ms < 5000 ? "green" : "amber", where));
    box.replaceChildren(...b);
  }
  function loopOverview() {
    tickOverview().finally(() => setTimeout(loopOverview, 2000));
  }

  // ---- routing ----
  let gen = 0;
  let viewTimer = null;
  function parseRoute() {
    const h = location.hash.replace(/^#/, "");
    const m = /^\/mapping\/(.+)$/.exec(h);
    if (m) {
      try { return { view: "mapping", id: decodeURIComponent(m[1]) }; } catch (_) { return { view: "main" }; }
    }
    if (h === "/fleet") return { view: "fleet" };
    if (h === "/events") return { view: "events" };
    return { view: "main" };
  }
  function route() {
    const r = parseRoute();
    const g = ++gen;
    clearTimeout(viewTimer);
    for (const v of ["main", "mapping", "fleet", "events"]) $("view-" + v).hidden = v !== r.view;
    for (const a of $("nav").querySelectorAll("a[data-view]")) {
      const on = a.getAttribute("data-view") === r.view;
      a.classList.toggle("active", on);
      if (on) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
    }
    document.title = r.view === "mapping" ? r.id + " \u00b7 envoy-docker" : r.view === "main" ? "envoy-docker" : r.view + " \u00b7 envoy-docker";
    let tick, every;
    if (r.view === "main") { tick = tickMappings; every = 1000; }
    else if (r.view === "mapping") { tick = mappingView($("view-mapping"), r.id); every = 2000; }
    else if (r.view === "fleet") { tick = fleetView($("view-fleet")); every = 2000; }
    else { tick = eventsView($("view-events")); every = 2000; }
    const isCurrent = () => g === gen;
    const loop = async () => {
      if (!isCurrent()) return;
      try { await tick(isCurrent); } catch (e) { console.error(e); }
      if (isCurrent()) viewTimer = setTimeout(loop, every);
    };
    loop();
  }

  function start() {
    buildHead();
    $("filter").addEventListener("input", () => renderMappings());
    window.addEventListener("hashchange", route);
    route();
    loopOverview();
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
