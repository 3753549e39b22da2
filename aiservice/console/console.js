// aiservice operator console: plain JavaScript, no build step, no library.
// Every value from the API reaches the page as a text node or an attribute (never as HTML).
"use strict";

const API = "/api/v1";
const TOKEN_KEY = "aiservice.token";
const REFRESH_MS = 5000;
const STATUSES = ["pending", "running", "completed", "failed", "cancelled"];
const STATUS_ICON = { pending: "◷", running: "▶", completed: "✓", failed: "✗", cancelled: "⊘" };
const FILTER_FIELDS = ["owner_service", "owner_ref", "task_type", "model_profile"];
// Filters of the list that POST /jobs/retry and /jobs/cancel do not take.
const LIST_ONLY_FIELDS = ["error_category", "batch_id"];
const SVG = "http://www.w3.org/2000/svg";

const state = { tokenRequired: false, timer: null, renderId: 0 };

// ---- DOM helpers -------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "on") {
      for (const [event, fn] of Object.entries(value)) el.addEventListener(event, fn);
    } else if (key === "class") {
      el.className = value;
    } else if (key === "dataset") {
      Object.assign(el.dataset, value);
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function svg(tag, attrs, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, String(value));
  if (text !== undefined) el.textContent = text;
  return el;
}

function statusBadge(status) {
  return h("span", { class: `status status-${status}`, "data-status": status }, `${STATUS_ICON[status] || "•"} ${status}`);
}

function dash(value) {
  return value === null || value === undefined || value === "" ? "—" : String(value);
}

function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleString();
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const s = Math.max(0, Number(seconds));
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 90) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

function between(from, to) {
  if (!from || !to) return null;
  return (new Date(to).getTime() - new Date(from).getTime()) / 1000;
}

function table(columns, rows, options) {
  // columns: [{label, num?, nowrap?}], rows: arrays of cells (string or Node); stacks into cards on a
  // phone. A nowrap column (names, categories) never breaks inside a word: the table scrolls instead.
  const opts = options || {};
  if (!rows.length) return h("p", { class: "muted" }, opts.empty || "Nothing here.");
  const head = h("tr", {}, columns.map((c) => h("th", { class: c.num ? "num" : null, scope: "col" }, c.label)));
  const body = rows.map((cells) =>
    h(
      "tr",
      {},
      cells.map((cell, i) =>
        h(
          "td",
          {
            class: columns[i].num ? "num" : columns[i].nowrap ? "nowrap" : "wrap",
            title: columns[i].nowrap && typeof cell === "string" ? cell : null,
            "data-label": columns[i].label,
          },
          cell,
        ),
      ),
    ),
  );
  return h("div", { class: "scroll" }, h("table", { class: "stack", "data-testid": opts.testid }, h("thead", {}, head), h("tbody", {}, body)));
}

function card(title, ...children) {
  return h("section", { class: "card" }, h("h2", {}, title), ...children);
}

function wide(title, ...children) {
  // A card that spans two grid columns where there is room (its table has many columns).
  const section = card(title, ...children);
  section.classList.add("wide");
  return section;
}

function flash(message, isError) {
  const el = document.getElementById("flash");
  el.textContent = message || "";
  el.className = isError ? "error" : "";
}

function confirmAction(text, yesLabel) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("confirm-yes").textContent = yesLabel || "Confirm";
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
  });
}

// ---- the API -----------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

async function api(method, target, body) {
  const headers = { Accept: "application/json" };
  if (token()) headers.Authorization = `Bearer ${token()}`;
  const init = { method, headers };
  // Every POST, PUT and DELETE says JSON, with a body or without: the API refuses one that does not (CSRF).
  if (method !== "GET") headers["Content-Type"] = "application/json";
  if (body !== undefined) init.body = JSON.stringify(body);
  let response;
  try {
    response = await fetch(API + target, init);
  } catch (exc) {
    throw new ApiError(0, "network", `The API did not answer (${exc.message}).`);
  }
  if (response.status === 204) return null;
  const data = await response.json().catch(() => null);
  if (response.ok) return data;
  const error = (data && data.error) || {};
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin("The token was refused. Enter the service token again.");
  }
  throw new ApiError(response.status, error.code || "http_error", error.message || `HTTP ${response.status}`);
}

// A path of the API or of the console, each segment encoded: names may hold "/", "?", "#", "%" or
// spaces. "." and ".." cannot travel as a segment at all (every URL parser resolves them away, even
// encoded), so they are refused here rather than sent to another route.
function path(...segments) {
  return segments
    .map((segment) => {
      const text = String(segment);
      if (text === "." || text === "..") throw new Error(`"${text}" cannot be named in a URL path`);
      return `/${encodeURIComponent(text)}`;
    })
    .join("");
}

function qs(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    for (const v of [].concat(value)) if (v !== undefined && v !== null && v !== "") search.append(key, v);
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

// ---- routing -----------------------------------------------------------------------------------

function route() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [where, query] = raw.split("?");
  const parts = where
    .split("/")
    .filter(Boolean)
    .map((part) => {
      try {
        return decodeURIComponent(part);
      } catch {
        return part;
      }
    });
  return { parts, params: new URLSearchParams(query || "") };
}

const VIEWS = {
  overview: renderOverview,
  jobs: (r) => (r.parts[1] ? renderJob(r.parts[1]) : renderJobs(r.params)),
  limits: renderLimits,
  batches: (r) => (r.parts[1] ? renderBatch(r.parts[1]) : renderBatches(r.params)),
  webhooks: renderWebhooks,
};

async function render() {
  if (state.timer) clearInterval(state.timer);
  state.timer = null;
  const r = route();
  const name = VIEWS[r.parts[0]] ? r.parts[0] : "overview";
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.view === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const id = ++state.renderId;
  try {
    const node = await VIEWS[name](r);
    if (id !== state.renderId || !node) return; // a newer view was asked for meanwhile
    document.getElementById("view").replaceChildren(node);
  } catch (exc) {
    if (id !== state.renderId || exc.status === 401) return;
    document.getElementById("view").replaceChildren(h("p", { class: "error-text", role: "alert" }, `Could not load: ${exc.message}`));
  }
}

function every(ms, fn) {
  const id = state.renderId;
  state.timer = setInterval(() => {
    if (id === state.renderId && !document.hidden) fn();
  }, ms);
}

// ---- Overview ----------------------------------------------------------------------------------

function totalsOf(stats) {
  // Newer servers answer `totals`; otherwise add up by_status (status × task_type × model_profile).
  const totals = Object.fromEntries(STATUSES.map((s) => [s, 0]));
  if (stats.totals && typeof stats.totals === "object") {
    for (const s of STATUSES) totals[s] = Number(stats.totals[s] || 0);
    return totals;
  }
  for (const row of stats.by_status || []) totals[row.status] = (totals[row.status] || 0) + row.count;
  return totals;
}

function minuteChart(minutes) {
  // 60 columns, oldest on the left: completed upwards, failed downwards, so the two read apart
  // without their colours; each column's title gives its numbers.
  const width = 400;
  const half = 60;
  const now = new Date();
  now.setSeconds(0, 0);
  const byMinute = new Map(minutes.map((m) => [new Date(m.minute).getTime(), m]));
  const slots = [];
  for (let i = 59; i >= 0; i--) {
    const at = now.getTime() - i * 60000;
    slots.push(byMinute.get(at) || { minute: new Date(at).toISOString(), completed: 0, failed: 0 });
  }
  const max = Math.max(1, ...slots.map((m) => Math.max(m.completed, m.failed)));
  const caption = "Jobs completed (up) and failed (down) per minute, last 60 minutes";
  const root = svg("svg", { viewBox: `0 0 ${width} ${2 * half + 20}`, role: "img", "aria-label": caption });
  root.append(svg("title", {}, caption));
  const step = width / 60;
  slots.forEach((m, i) => {
    const x = i * step + 1;
    const up = (half * m.completed) / max;
    const down = (half * m.failed) / max;
    const group = svg("g", {});
    group.append(svg("title", {}, `${new Date(m.minute).toLocaleTimeString()}: ${m.completed} completed, ${m.failed} failed`));
    if (m.completed) group.append(svg("rect", { x, y: half - up, width: step - 2, height: up, class: "bar-completed" }));
    if (m.failed) group.append(svg("rect", { x, y: half, width: step - 2, height: down, class: "bar-failed" }));
    root.append(group);
  });
  root.append(svg("line", { x1: 0, x2: width, y1: half, y2: half, class: "axis" }));
  root.append(svg("text", { x: 0, y: 2 * half + 16 }, "60 min ago"));
  root.append(svg("text", { x: width - 30, y: 2 * half + 16 }, "now"));
  return root;
}

async function renderOverview() {
  const container = h("div", {});
  const draw = async () => {
    const stats = await api("GET", path("stats"));
    container.replaceChildren(overview(stats));
  };
  await draw();
  every(REFRESH_MS, () => draw().catch((exc) => flash(`Refresh failed: ${exc.message}`, true)));
  return container;
}

function overview(stats) {
  const totals = totalsOf(stats);
  const totalCards = STATUSES.map((s) =>
    h(
      "a",
      { class: `total status-${s}`, href: `#/jobs${qs({ status: s })}`, "data-testid": `total-${s}` },
      statusBadge(s),
      h("span", { class: "count" }, String(totals[s])),
    ),
  );

  const chart = minuteChart(stats.per_minute || []);
  const hour = (stats.per_minute || []).reduce(
    (sum, m) => ({ completed: sum.completed + m.completed, failed: sum.failed + m.failed }),
    { completed: 0, failed: 0 },
  );

  const categories = new Map();
  for (const e of stats.errors || []) categories.set(e.error_category, { day: e.count, hour: 0 });
  for (const e of stats.errors_last_hour || []) {
    const entry = categories.get(e.error_category) || { day: 0, hour: 0 };
    entry.hour = e.count;
    categories.set(e.error_category, entry);
  }

  return h(
    "div",
    {},
    h("h1", {}, "Overview"),
    h("div", { class: "totals", "data-testid": "totals" }, totalCards),
    h(
      "div",
      { class: "grid" },
      card(
        "Throughput",
        h("div", { class: "chart", "data-testid": "throughput" }, chart),
        h(
          "p",
          { class: "note", "data-testid": "throughput-totals" },
          `Last hour: ${hour.completed} completed, ${hour.failed} failed (per minute; ` +
            "completed bars point up, failed bars point down).",
        ),
      ),
      card(
        "Errors by category",
        table(
          [{ label: "Category", nowrap: true }, { label: "Last hour", num: true }, { label: "Last day", num: true }],
          [...categories.entries()].map(([c, n]) => [
            c ? h("a", { href: `#/jobs${qs({ error_category: c, status: "failed" })}`, title: `Failed jobs of ${c}` }, c) : "—",
            String(n.hour),
            String(n.day),
          ]),
          { empty: "No terminal failures in the last day.", testid: "errors" },
        ),
      ),
      card(
        "Oldest pending",
        h("p", { class: "muted" }, `Overall: ${duration(stats.oldest_pending_age_seconds)}`),
        table(
          [{ label: "Task type", nowrap: true }, { label: "Age", num: true }],
          (stats.oldest_pending || []).map((p) => [p.task_type, duration(p.age_seconds)]),
          { empty: "No pending jobs.", testid: "oldest-pending" },
        ),
      ),
      card(
        "Running by worker",
        table(
          [{ label: "Worker", nowrap: true }, { label: "Running", num: true }],
          (stats.running_by_worker || []).map((w) => [w.worker_id, String(w.count)]),
          { empty: "No running jobs.", testid: "workers" },
        ),
      ),
      wide(
        "Latency (finished in the window)",
        table(
          [
            { label: "Task type", nowrap: true },
            { label: "Jobs", num: true },
            { label: "Wait p50", num: true },
            { label: "Wait p95", num: true },
            { label: "Run p50", num: true },
            { label: "Run p95", num: true },
          ],
          (stats.latency || []).map((l) => [
            l.task_type,
            String(l.count),
            duration(l.wait_p50_ms / 1000),
            duration(l.wait_p95_ms / 1000),
            duration(l.run_p50_ms / 1000),
            duration(l.run_p95_ms / 1000),
          ]),
          { empty: "No jobs finished in the window.", testid: "latency" },
        ),
      ),
    ),
    h("p", { class: "note" }, `Updated ${new Date().toLocaleTimeString()}; refreshes every ${REFRESH_MS / 1000} s.`),
  );
}

// ---- Jobs --------------------------------------------------------------------------------------

function filterFrom(params) {
  const filter = {};
  for (const f of FILTER_FIELDS) if (params.get(f)) filter[f] = params.get(f);
  const statuses = params.getAll("status").filter((s) => STATUSES.includes(s));
  if (statuses.length) filter.status = statuses;
  for (const f of LIST_ONLY_FIELDS) if (params.get(f)) filter[f] = params.get(f);
  return filter;
}

function filterForm(filter) {
  const inputs = FILTER_FIELDS.map((f) =>
    h("label", {}, f, h("input", { name: f, value: filter[f] || "", autocomplete: "off", "data-testid": `filter-${f}` })),
  );
  const category = h(
    "label",
    {},
    "error_category",
    h("input", { name: "error_category", value: filter.error_category || "", autocomplete: "off", "data-testid": "filter-error_category" }),
  );
  const batch = h("label", {}, "batch_id", h("input", { name: "batch_id", inputmode: "numeric", value: filter.batch_id || "" }));
  const statuses = h(
    "fieldset",
    {},
    h("legend", {}, "status"),
    STATUSES.map((s) =>
      h(
        "label",
        { class: "check" },
        h("input", { type: "checkbox", name: "status", value: s, checked: (filter.status || []).includes(s) }),
        `${STATUS_ICON[s]} ${s}`,
      ),
    ),
  );
  const form = h(
    "form",
    { class: "filters", role: "search", "data-testid": "job-filters" },
    inputs,
    category,
    batch,
    statuses,
    h("div", { class: "row-actions" }, h("button", { type: "submit", class: "primary" }, "Apply filter"), h("a", { href: "#/jobs" }, "Clear")),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const params = {};
    for (const f of [...FILTER_FIELDS, ...LIST_ONLY_FIELDS]) params[f] = String(data.get(f) || "").trim();
    params.status = data.getAll("status");
    location.hash = `#/jobs${qs(params)}`;
  });
  return form;
}

function jobLink(id, text) {
  return h("a", { href: `#${path("jobs", id)}` }, text || `#${id}`);
}

function jobRows(jobs) {
  return jobs.map((j) => [
    jobLink(j.id),
    h("span", {}, statusBadge(j.status), j.blocked ? h("span", { class: "blocked" }, " ⋯ blocked") : null),
    j.owner_service,
    j.owner_ref,
    j.task_type,
    j.model_profile,
    `${j.attempts}/${j.max_attempts}`,
    // The category, with the message on hover (a title is text, never markup).
    h("span", { "data-testid": `error-${j.id}`, title: j.error_message || null, class: j.error_category ? "error-text" : "muted" }, dash(j.error_category)),
    when(j.created_at),
  ]);
}

const JOB_COLUMNS = [
  { label: "Job" },
  { label: "Status" },
  { label: "Owner service" },
  { label: "Owner ref" },
  { label: "Task type" },
  { label: "Model profile" },
  { label: "Attempts", num: true },
  { label: "Error", nowrap: true },
  { label: "Created" },
];

async function renderJobs(params) {
  const filter = filterFrom(params);
  const cursor = params.get("cursor");
  const page = await api("GET", `${path("jobs")}${qs({ ...filter, cursor, limit: 50 })}`);
  const hasFilter = Object.keys(filter).length > 0;

  const bulk = async (action) => {
    const selection = { ...filter };
    const what = action === "retry" ? "Retry every failed or running job" : "Cancel every pending or running job";
    const ok = await confirmAction(`${what} matching this filter? ${JSON.stringify(selection)}`, action === "retry" ? "Retry them" : "Cancel them");
    if (!ok) return;
    try {
      const done = await api("POST", path("jobs", action), selection);
      flash(`${action === "retry" ? "Retried" : "Cancelled"} ${done.count} job(s).`);
      render();
    } catch (exc) {
      flash(`${action} failed: ${exc.message}`, true);
    }
  };
  const listOnly = LIST_ONLY_FIELDS.filter((f) => filter[f]);
  const bulkAllowed = hasFilter && !listOnly.length;
  const bulkNote = !hasFilter
    ? "Set a filter to retry or cancel by filter."
    : listOnly.length
      ? `Retry and cancel by filter do not take ${listOnly.join(" or ")}: remove it${filter.batch_id ? ", or use the batch page" : ""}.`
      : "";

  const next = page.next_cursor ? `#/jobs${qs({ ...filter, cursor: page.next_cursor })}` : null;
  return h(
    "div",
    {},
    h("h1", {}, "Jobs"),
    filterForm(filter),
    h(
      "div",
      { class: "actions" },
      h("button", { type: "button", disabled: !bulkAllowed, on: { click: () => bulk("retry") } }, "↻ Retry matching"),
      h("button", { type: "button", disabled: !bulkAllowed, on: { click: () => bulk("cancel") } }, "⊘ Cancel matching"),
      bulkNote ? h("span", { class: "muted" }, bulkNote) : null,
    ),
    table(JOB_COLUMNS, jobRows(page.jobs), { empty: "No jobs match.", testid: "jobs" }),
    h(
      "div",
      { class: "actions" },
      cursor ? h("a", { href: `#/jobs${qs(filter)}` }, "⇤ Newest") : null,
      next ? h("a", { href: next, "data-testid": "next-page" }, "Older →") : h("span", { class: "muted" }, "End of list."),
    ),
  );
}

async function renderJob(rawId) {
  if (!/^[0-9]+$/.test(rawId)) throw new Error("a job id is a number");
  const [job, links] = await Promise.all([
    api("GET", path("jobs", rawId)),
    // A server without the route answers 404: the page then goes without the pipeline card.
    api("GET", `${path("jobs", rawId, "dependencies")}${qs({ limit: 100 })}`).catch((exc) => (exc.status === 404 ? null : Promise.reject(exc))),
  ]);

  const act = async (action) => {
    const text = action === "retry" ? `Retry job #${job.id}? It goes back to pending with attempts starting over.` : `Cancel job #${job.id}?`;
    if (!(await confirmAction(text, action === "retry" ? "Retry" : "Cancel job"))) return;
    try {
      const updated = await api("POST", path("jobs", job.id, action));
      flash(`Job #${updated.id} is now ${updated.status}.`);
      render();
    } catch (exc) {
      flash(`${action} failed: ${exc.message}`, true);
    }
  };
  const canRetry = job.status === "failed" || job.status === "running";
  const canCancel = job.status === "pending" || job.status === "running";

  const steps = [
    ["Created", job.created_at, null],
    ["Started", job.started_at, job.started_at ? `waited ${duration(between(job.created_at, job.started_at))}` : null],
    ["Finished", job.finished_at, job.finished_at ? `ran ${duration(between(job.started_at, job.finished_at))}` : null],
  ];
  const timeline = h(
    "ol",
    { class: "timeline" },
    steps.map(([label, at, extra]) =>
      h("li", { class: at ? "done" : null }, h("strong", {}, `${at ? "●" : "○"} ${label}: `), when(at), extra ? ` (${extra})` : ""),
    ),
  );

  return h(
    "div",
    {},
    h("p", {}, h("a", { href: "#/jobs" }, "← Jobs")),
    h("h1", {}, `Job #${job.id} `, statusBadge(job.status)),
    job.blocked ? h("p", { class: "blocked", "data-testid": "blocked" }, "⋯ Blocked: waiting for its dependencies to complete.") : null,
    h(
      "div",
      { class: "actions" },
      h("button", { type: "button", disabled: !canRetry, "data-testid": "retry", on: { click: () => act("retry") } }, "↻ Retry"),
      h("button", { type: "button", disabled: !canCancel, "data-testid": "cancel", on: { click: () => act("cancel") } }, "⊘ Cancel"),
    ),
    h(
      "div",
      { class: "grid" },
      card(
        "Job",
        h(
          "dl",
          { class: "kv", "data-testid": "job-fields" },
          [
            ["Status", statusBadge(job.status)],
            ["Blocked", job.blocked ? "yes" : "no"],
            ["Owner service", job.owner_service],
            ["Owner ref", job.owner_ref],
            ["Task type", job.task_type],
            ["Model profile", job.model_profile],
            ["Priority", String(job.priority)],
            ["Attempts", `${job.attempts} of ${job.max_attempts}`],
            ["Run at", when(job.run_at)],
            ["Worker", dash(job.worker_id)],
            ["Lease expires", when(job.lease_expires_at)],
            ["Idempotency key", dash(job.idempotency_key)],
            ["Batch", job.batch_id ? h("a", { href: `#${path("batches", job.batch_id)}` }, `batch #${job.batch_id}`) : "—"],
            ["Updated", when(job.updated_at)],
          ].map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
        ),
      ),
      card(
        "Timeline",
        timeline,
        job.error_category || job.error_message
          ? h(
              "div",
              { class: "error-text", "data-testid": "job-error" },
              h("p", {}, h("strong", {}, "✗ Last error: "), dash(job.error_category)),
              h("pre", { class: "json" }, job.error_message ? linkedText(job.error_message) : "—"),
            )
          : h("p", { class: "muted" }, "No error recorded."),
      ),
      links && (links.depends_on.length || links.dependents.length) ? pipelineCard(links) : null,
      card("Input", h("pre", { class: "json", "data-testid": "job-input" }, JSON.stringify(job.input, null, 2))),
      card(
        "Result",
        job.result === null ? h("p", { class: "muted" }, "No result yet.") : h("pre", { class: "json", "data-testid": "job-result" }, JSON.stringify(job.result, null, 2)),
      ),
    ),
  );
}

// Error messages that name a job ("dependency 22 is cancelled") link to it; the rest stays text.
function linkedText(text) {
  const nodes = [];
  let last = 0;
  for (const match of text.matchAll(/\bdependency (\d+)\b/g)) {
    nodes.push(text.slice(last, match.index), jobLink(match[1], match[0]));
    last = match.index + match[0].length;
  }
  nodes.push(text.slice(last));
  return nodes;
}

function linkList(items, testid, more) {
  if (!items.length) return h("p", { class: "muted", "data-testid": testid }, "None");
  return h(
    "ul",
    { class: "links", "data-testid": testid },
    items.map((j) => h("li", {}, jobLink(j.id), " ", statusBadge(j.status), " ", h("span", { class: "mono" }, j.task_type))),
    more ? h("li", { class: "muted" }, more) : null,
  );
}

function pipelineCard(links) {
  return card(
    "Pipeline",
    h("h3", {}, "Depends on"),
    linkList(links.depends_on, "depends-on"),
    h("h3", {}, "Needed by"),
    linkList(links.dependents, "dependents", links.next_cursor ? `… and more (the first ${links.dependents.length} shown)` : null),
  );
}

// ---- Limits ------------------------------------------------------------------------------------

const CAP_FIELDS = ["max_running", "max_per_minute", "max_tokens_per_minute"];
// The fields each scope uses (schema/functions/limits.sql): caps everywhere, the fair-share weight
// for callers, the cool-down switch for model profiles. The editor shows only these.
const SCOPES = ["task_type", "model_profile", "owner_service"];
const SCOPE_FIELDS = {
  task_type: [...CAP_FIELDS],
  model_profile: [...CAP_FIELDS, "cooldown"],
  owner_service: [...CAP_FIELDS, "weight"],
};

async function renderLimits() {
  const container = h("div", {});
  let editing = false;

  const save = async (scope, name, fields) => {
    try {
      await api("PUT", path("limits", scope, name), fields);
      flash(`Saved ${scope} ${name}.`);
      return true;
    } catch (exc) {
      flash(`Saving ${scope} ${name} failed: ${exc.message}`, true);
      return false;
    }
  };

  const editor = (limit, onDone) => {
    const isNew = !limit;
    const current = limit || { scope: "task_type", name: "", weight: 1, cooldown: true };
    const select = isNew ? h("select", { name: "scope" }, SCOPES.map((s) => h("option", { value: s }, s))) : null;
    const scope = isNew ? h("label", {}, "scope", select) : null;
    const nameInput = isNew ? h("label", {}, "name", h("input", { name: "name", required: true, autocomplete: "off" })) : null;
    const caps = CAP_FIELDS.map((f) =>
      h("label", {}, `${f} (empty: none)`, h("input", { name: f, type: "number", min: 0, step: 1, value: current[f] ?? "" })),
    );
    const weight = h("label", {}, "weight (share of claims)", h("input", { name: "weight", type: "number", min: 1, step: 1, value: current.weight ?? 1 }));
    const cooldown = h(
      "label",
      { class: "check" },
      h("input", { type: "checkbox", name: "cooldown", checked: current.cooldown !== false }),
      "cool-down on rate limits",
    );
    // An existing limit shows its scope's fields only; a new one follows the scope chosen.
    const extras = { weight, cooldown };
    const showScope = (s) => {
      for (const [field, label] of Object.entries(extras)) label.hidden = !SCOPE_FIELDS[s].includes(field);
    };
    showScope(current.scope);
    if (select) select.addEventListener("change", () => showScope(select.value));
    const form = h(
      "form",
      { class: "filters", "data-testid": "limit-editor" },
      scope,
      nameInput,
      caps,
      isNew || SCOPE_FIELDS[current.scope].includes("weight") ? weight : null,
      isNew || SCOPE_FIELDS[current.scope].includes("cooldown") ? cooldown : null,
      h(
        "div",
        { class: "row-actions" },
        h("button", { type: "submit", class: "primary" }, "Save"),
        h("button", { type: "button", on: { click: () => onDone(false) } }, "Close"),
      ),
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const data = new FormData(form);
      const s = isNew ? String(data.get("scope")) : limit.scope;
      const n = isNew ? String(data.get("name")).trim() : limit.name;
      const fields = {};
      for (const f of CAP_FIELDS) {
        const raw = String(data.get(f) || "").trim();
        fields[f] = raw === "" ? null : Number(raw);
      }
      if (SCOPE_FIELDS[s].includes("weight")) fields.weight = Number(data.get("weight") || 1);
      if (SCOPE_FIELDS[s].includes("cooldown")) fields.cooldown = data.get("cooldown") === "on";
      if (await save(s, n, fields)) onDone(true);
    });
    return form;
  };

  const draw = async () => {
    const { limits } = await api("GET", path("limits"));
    const slot = h("div", {});
    const openEditor = (limit) => {
      editing = true;
      slot.replaceChildren(
        card(
          limit ? `Edit ${limit.scope} ${limit.name}` : "New limit",
          editor(limit, (changed) => {
            editing = false;
            slot.replaceChildren();
            if (changed) draw();
          }),
        ),
      );
      slot.querySelector("input, select").focus();
    };
    const toggle = async (limit) => {
      if (await save(limit.scope, limit.name, { paused: !limit.paused })) draw();
    };
    const rows = limits.map((l) => {
      const label = `${l.scope} ${l.name}`;
      const stateText = l.paused ? "‖ paused" : "▶ active";
      return [
        l.scope,
        h("span", { class: "mono" }, l.name),
        h(
          "span",
          { "data-testid": `limit-state-${l.scope}-${l.name}` },
          stateText,
          l.cooldown_until ? h("span", { class: "blocked" }, ` ◑ cooling down until ${when(l.cooldown_until)}`) : null,
        ),
        `${l.running} / ${dash(l.max_running)}`,
        `${l.started_last_minute} / ${dash(l.max_per_minute)}`,
        `${l.tokens_last_minute} / ${dash(l.max_tokens_per_minute)}`,
        l.scope === "owner_service" ? String(l.weight) : "—",
        l.scope === "model_profile" ? (l.cooldown ? "on" : "off") : "—",
        h(
          "div",
          { class: "row-actions" },
          h(
            "button",
            { type: "button", "aria-label": `${l.paused ? "Resume" : "Pause"} ${label}`, "data-testid": `toggle-${l.scope}-${l.name}`, on: { click: () => toggle(l) } },
            l.paused ? "▶ Resume" : "‖ Pause",
          ),
          h("button", { type: "button", "aria-label": `Edit ${label}`, "data-testid": `edit-${l.scope}-${l.name}`, on: { click: () => openEditor(l) } }, "✎ Edit caps"),
          l.cooldown_until
            ? h("button", { type: "button", on: { click: async () => (await save(l.scope, l.name, { cooldown_until: null })) && draw() } }, "End cool-down")
            : null,
        ),
      ];
    });
    container.replaceChildren(
      h("h1", {}, "Limits"),
      h("p", { class: "muted" }, "Usage is live: running now / cap, started in the last minute / cap, tokens in the last minute / cap."),
      table(
        [
          { label: "Scope" },
          { label: "Name" },
          { label: "State" },
          { label: "Running", num: true },
          { label: "Started/min", num: true },
          { label: "Tokens/min", num: true },
          { label: "Weight", num: true },
          { label: "Cool-down" },
          { label: "Actions" },
        ],
        rows,
        { empty: "No limits set: every job can be claimed.", testid: "limits" },
      ),
      h("div", { class: "actions" }, h("button", { type: "button", on: { click: () => openEditor(null) } }, "+ New limit")),
      slot,
    );
  };
  await draw();
  every(REFRESH_MS, () => {
    if (!editing) draw().catch((exc) => flash(`Refresh failed: ${exc.message}`, true));
  });
  return container;
}

// ---- Batches -----------------------------------------------------------------------------------

function batchState(batch) {
  return batch.status === "finished" ? "✓ finished" : "◷ in progress";
}

async function renderBatches(params) {
  const owner = params.get("owner_service") || "";
  const cursor = params.get("cursor");
  const page = await api("GET", `${path("batches")}${qs({ owner_service: owner, cursor, limit: 50 })}`);

  const filter = h(
    "form",
    { class: "filters", role: "search", "data-testid": "batch-filters" },
    h("label", {}, "owner_service", h("input", { name: "owner_service", value: owner, autocomplete: "off", "data-testid": "filter-batch-owner_service" })),
    h("div", { class: "row-actions" }, h("button", { type: "submit", class: "primary" }, "Apply filter"), h("a", { href: "#/batches" }, "Clear")),
  );
  filter.addEventListener("submit", (event) => {
    event.preventDefault();
    location.hash = `#/batches${qs({ owner_service: String(new FormData(filter).get("owner_service") || "").trim() })}`;
  });
  const open = h(
    "form",
    { class: "filters" },
    h("label", {}, "Batch id", h("input", { name: "id", inputmode: "numeric", required: true, pattern: "[0-9]+" })),
    h("div", { class: "row-actions" }, h("button", { type: "submit" }, "Open")),
  );
  open.addEventListener("submit", (event) => {
    event.preventDefault();
    location.hash = `#${path("batches", String(new FormData(open).get("id")).trim())}`;
  });

  const rows = page.batches.map((b) => [
    h("a", { href: `#${path("batches", b.id)}` }, `#${b.id}`),
    b.owner_service,
    h("span", { class: b.status === "finished" ? "status status-completed" : "status status-pending" }, batchState(b)),
    String(b.counts.total),
    String(b.counts.pending),
    String(b.counts.running),
    String(b.counts.completed),
    String(b.counts.failed),
    String(b.counts.cancelled),
    when(b.created_at),
  ]);
  const next = page.next_cursor ? `#/batches${qs({ owner_service: owner, cursor: page.next_cursor })}` : null;
  return h(
    "div",
    {},
    h("h1", {}, "Batches"),
    h("p", { class: "muted" }, "Newest first. A batch is the jobs one POST /jobs/batch made; its owner is its first job's owner_service."),
    filter,
    table(
      [
        { label: "Batch" },
        { label: "Owner service", nowrap: true },
        { label: "State" },
        { label: "Jobs", num: true },
        { label: "Pending", num: true },
        { label: "Running", num: true },
        { label: "Completed", num: true },
        { label: "Failed", num: true },
        { label: "Cancelled", num: true },
        { label: "Created" },
      ],
      rows,
      { empty: owner ? `No batches of ${owner}.` : "No batches yet.", testid: "batches" },
    ),
    h(
      "div",
      { class: "actions" },
      cursor ? h("a", { href: `#/batches${qs({ owner_service: owner })}` }, "⇤ Newest") : null,
      next ? h("a", { href: next, "data-testid": "next-page" }, "Older →") : h("span", { class: "muted" }, "End of list."),
    ),
    h("h2", {}, "Open a batch by its id"),
    open,
  );
}

async function renderBatch(rawId) {
  if (!/^[0-9]+$/.test(rawId)) throw new Error("a batch id is a number");
  const [batch, page] = await Promise.all([api("GET", path("batches", rawId)), api("GET", `${path("jobs")}${qs({ batch_id: rawId, limit: 50 })}`)]);
  const cancel = async () => {
    if (!(await confirmAction(`Cancel the pending and running jobs of batch #${batch.id}?`, "Cancel batch"))) return;
    try {
      await api("POST", path("batches", batch.id, "cancel"));
      flash(`Batch #${batch.id} cancelled.`);
      render();
    } catch (exc) {
      flash(`Cancel failed: ${exc.message}`, true);
    }
  };
  const counts = batch.counts;
  return h(
    "div",
    {},
    h("p", {}, h("a", { href: "#/batches" }, "← Batches")),
    h("h1", {}, `Batch #${batch.id} — ${batchState(batch)}`),
    h(
      "div",
      { class: "grid" },
      card(
        "Batch",
        h(
          "dl",
          { class: "kv" },
          [
            ["Owner service", h("a", { href: `#/batches${qs({ owner_service: batch.owner_service })}` }, batch.owner_service)],
            ["Created", when(batch.created_at)],
            ["Finished", when(batch.finished_at)],
          ].map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
        ),
        h("div", { class: "actions" }, h("button", { type: "button", disabled: batch.status === "finished", on: { click: cancel } }, "⊘ Cancel batch")),
      ),
      card(
        "Counts",
        table(
          [{ label: "Status" }, { label: "Jobs", num: true }],
          [["total", String(counts.total)], ...STATUSES.map((s) => [statusBadge(s), String(counts[s])])],
          { testid: "batch-counts" },
        ),
      ),
    ),
    h("h2", {}, "Jobs"),
    table(JOB_COLUMNS, jobRows(page.jobs), { empty: "No jobs.", testid: "jobs" }),
    page.next_cursor ? h("p", {}, h("a", { href: `#/jobs${qs({ batch_id: batch.id, cursor: page.next_cursor })}` }, "More jobs of this batch →")) : null,
  );
}

// ---- Webhooks ----------------------------------------------------------------------------------

const DELIVERY_PAGE = 50;

function safeUrl(raw) {
  // Credentials and query strings may hold secrets: show neither.
  try {
    const url = new URL(raw);
    const auth = url.username || url.password ? "***@" : "";
    return `${url.protocol}//${auth}${url.host}${url.pathname}${url.search ? "?…" : ""}`;
  } catch {
    return "(unparseable URL)";
  }
}

function deliveryOf(d) {
  if (d.job_id) return jobLink(d.job_id, `job #${d.job_id}`);
  if (d.batch_id) return h("a", { href: `#${path("batches", d.batch_id)}` }, `batch #${d.batch_id}`);
  return "—";
}

function lastAnswer(d) {
  return `${d.last_status ? `HTTP ${d.last_status}` : ""}${d.last_status && d.last_error ? " · " : ""}${d.last_error || ""}` || "—";
}

function counted(list) {
  return `${list.length}${list.length === DELIVERY_PAGE ? "+" : ""}`;
}

async function webhookCard(hook) {
  const owner = hook.owner_service;
  const send = async (d, what) => {
    try {
      await api("POST", path("webhooks", owner, "deliveries", d.id, "retry"));
      flash(`Delivery ${d.id} ${what}.`);
      render();
    } catch (exc) {
      flash(`Re-deliver failed: ${exc.message}`, true);
    }
  };
  let failed = null;
  let retrying = null;
  let problem = null;
  try {
    const list = (status) => api("GET", `${path("webhooks", owner, "deliveries")}${qs({ status, limit: DELIVERY_PAGE })}`);
    [failed, retrying] = (await Promise.all([list("failed"), list("retrying")])).map((page) => page.deliveries);
  } catch (exc) {
    // One endpoint the console cannot read (a name no URL can carry) leaves the others readable.
    problem = `${exc.message}${exc.status === undefined ? " (SQL: aiservice.list_deliveries)" : ""}`;
  }

  let stateText = "✓ enabled";
  let stateClass = "status status-completed";
  if (hook.disabled_at) {
    stateText = `⊘ disabled (410 Gone) since ${when(hook.disabled_at)}`;
    stateClass = "status status-cancelled";
  } else if (problem) {
    stateText = "? enabled; its deliveries could not be read";
    stateClass = "blocked";
  } else if (retrying.length) {
    stateText = `⚠ enabled, ${counted(retrying)} ${retrying.length === 1 ? "delivery" : "deliveries"} retrying: the receiver is not taking them`;
    stateClass = "blocked";
  }

  const sections = problem
    ? [h("p", { class: "error-text", role: "alert" }, `Deliveries unavailable: ${problem}.`)]
    : [
        h("h2", {}, `Retrying deliveries (${counted(retrying)})`),
        table(
          [
            { label: "Delivery", nowrap: true },
            { label: "Event", nowrap: true },
            { label: "Of", nowrap: true },
            { label: "Attempts", num: true },
            { label: "Next attempt" },
            { label: "Last answer" },
            { label: "Created" },
            { label: "" },
          ],
          retrying.map((d) => [
            `#${d.id}`,
            d.event,
            deliveryOf(d),
            String(d.attempts),
            when(d.next_attempt_at),
            lastAnswer(d),
            when(d.created_at),
            h("button", { type: "button", "data-testid": `send-now-${d.id}`, on: { click: () => send(d, "will be sent now") } }, "↻ Send now"),
          ]),
          { empty: "No deliveries retrying.", testid: `retrying-${owner}` },
        ),
        h("h2", {}, `Failed deliveries (${counted(failed)})`),
        table(
          [
            { label: "Delivery", nowrap: true },
            { label: "Event", nowrap: true },
            { label: "Of", nowrap: true },
            { label: "Attempts", num: true },
            { label: "Last answer" },
            { label: "Created" },
            { label: "" },
          ],
          failed.map((d) => [
            `#${d.id}`,
            d.event,
            deliveryOf(d),
            String(d.attempts),
            lastAnswer(d),
            when(d.created_at),
            h("button", { type: "button", "data-testid": `redeliver-${d.id}`, on: { click: () => send(d, "queued again") } }, "↻ Re-deliver"),
          ]),
          { empty: "No failed deliveries.", testid: `deliveries-${owner}` },
        ),
      ];
  return h(
    "section",
    { class: "card", "data-testid": `webhook-${owner}` },
    h("h2", {}, "Endpoint of ", h("span", { class: "mono name" }, owner)),
    h(
      "dl",
      { class: "kv" },
      [
        ["URL", h("span", { class: "mono" }, safeUrl(hook.url))],
        ["Events", hook.events.join(", ")],
        ["State", h("span", { class: stateClass, "data-testid": `state-${owner}` }, stateText)],
        ["Updated", when(hook.updated_at)],
      ].map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
    ),
    sections,
  );
}

async function renderWebhooks() {
  const { webhooks } = await api("GET", path("webhooks"));
  const sections = await Promise.all(webhooks.map(webhookCard));
  return h(
    "div",
    {},
    h("h1", {}, "Webhooks"),
    h("p", { class: "muted" }, "Deliveries are retried (5 s doubling, at most 1 h) until WEBHOOK_MAX_AGE after the event, then fail."),
    webhooks.length ? h("div", { class: "cards" }, sections) : h("p", { class: "muted" }, "No webhook endpoints registered."),
  );
}

// ---- token and start-up ------------------------------------------------------------------------

function showLogin(message) {
  if (state.timer) clearInterval(state.timer);
  state.timer = null;
  state.renderId++;
  document.getElementById("sign-out").hidden = true;
  const input = h("input", { type: "password", name: "token", autocomplete: "current-password", required: true, "data-testid": "token" });
  const form = h(
    "form",
    {},
    h("label", {}, "Service token (AI_SERVICE_TOKEN)", input),
    h("button", { type: "submit", class: "primary" }, "Open the console"),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    start();
  });
  document.getElementById("view").replaceChildren(
    h(
      "section",
      { class: "card login" },
      h("h1", {}, "Sign in"),
      h("p", { class: "muted" }, "This service requires its bearer token. It is kept in this tab only (sessionStorage)."),
      message ? h("p", { class: "error-text", role: "alert" }, message) : null,
      form,
    ),
  );
  input.focus();
}

function start() {
  if (state.tokenRequired && !token()) {
    showLogin("");
    return;
  }
  document.getElementById("sign-out").hidden = !state.tokenRequired;
  flash("");
  render();
}

async function boot() {
  document.getElementById("sign-out").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin("");
  });
  window.addEventListener("hashchange", () => {
    flash("");
    if (!state.tokenRequired || token()) render();
  });
  try {
    const config = await (await fetch("config.json", { headers: { Accept: "application/json" } })).json();
    state.tokenRequired = Boolean(config.token_required);
  } catch {
    state.tokenRequired = true;
  }
  start();
}

boot();
