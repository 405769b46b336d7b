// Job page: live charts and events log over the dashboard's SSE stream (same events as
// GET /v1/fine_tuning/jobs/{id}/events?stream=true), plus a status poll that reloads the page when
// the job changes state (buttons, results and checkpoints are rendered by the server).
(() => {
  "use strict";
  const root = document.getElementById("job");
  if (!root || typeof uPlot === "undefined") return;
  const jobId = root.dataset.jobId;
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const BLUE = "#2563eb", RED = "#dc2626", GREY = "#6b7280", GREEN = "#059669";

  // [metric key, legend label, colour, dashed]. Keys are those of the worker's metrics events
  // (worker/training/callbacks.py ReportingCallback): train and validation reports of a step merge.
  const SPECS = [
    { id: "chart-loss", series: [["train_loss", "training loss", BLUE], ["valid_loss", "validation loss", RED]] },
    { id: "chart-margin", series: [["ipo_margin", "training margin", BLUE], ["valid_ipo_margin", "validation margin", RED],
                                   ["ipo_margin_target", "target 1/(2β)", GREY, true]] },
    { id: "chart-accuracy", range: [0, 1],
      series: [["preference_accuracy", "training", BLUE], ["valid_preference_accuracy", "validation", RED],
               // supervised jobs: TRL's mean token accuracy on the assistant tokens
               ["token_accuracy", "training (token)", BLUE, true], ["valid_token_accuracy", "validation (token)", RED, true]] },
    { id: "chart-lr", series: [["learning_rate", "learning rate", GREEN]] },
  ];

  const STEP_INCREMENTS = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1e3, 2e3, 2500, 5e3, 1e4, 2e4, 5e4, 1e5, 1e6];
  const byStep = new Map();
  const charts = [];

  function makeChart(spec) {
    const el = document.getElementById(spec.id);
    const opts = {
      width: Math.max(el.clientWidth, 280),
      height: 220,
      scales: { x: { time: false }, y: spec.range ? { range: spec.range } : {} },
      axes: [{ label: "step", incrs: STEP_INCREMENTS }, { size: 64, values: (u, ticks) => ticks.map(tick) }],
      series: [{ label: "step" }].concat(spec.series.map(([, label, stroke, dashed]) => ({
        label, stroke, width: 2, spanGaps: true,
        dash: dashed ? [6, 4] : undefined,
        points: { show: !dashed, size: 4 },
      }))),
    };
    const plot = new uPlot(opts, [[]].concat(spec.series.map(() => [])), el);
    return { spec, el, plot };
  }

  function tick(v) {  // learning rates are ~1e-5: uPlot's default labels would all read "0"
    if (v === null) return "";
    return v !== 0 && Math.abs(v) < 1e-3 ? v.toExponential(1) : String(Number(v.toPrecision(4)));
  }

  function number(v) {
    return typeof v === "number" && Number.isFinite(v) ? v : null;
  }

  let scheduled = null;
  function scheduleRedraw() {
    if (scheduled === null) scheduled = setTimeout(redraw, 100);  // batch a replay's many events
  }

  function redraw() {
    scheduled = null;
    const steps = Array.from(byStep.keys()).sort((a, b) => a - b);
    for (const chart of charts) {
      const columns = chart.spec.series.map(([key]) => steps.map((s) => number(byStep.get(s)[key])));
      const shown = columns[0].filter((v) => v !== null).length;
      const xs = steps.filter((_, i) => columns.some((col) => col[i] !== null));
      const keep = steps.map((_, i) => columns.some((col) => col[i] !== null));
      chart.plot.setData([xs].concat(columns.map((col) => col.filter((_, i) => keep[i]))));
      chart.el.dataset.points = String(shown);
    }
  }

  function addMetrics(data) {
    const step = number(data.step);
    if (step === null) return;
    byStep.set(step, Object.assign(byStep.get(step) || {}, data));  // a resumed attempt overwrites
    scheduleRedraw();
  }

  const MAX_LOG_ROWS = 2000;
  const eventsBody = document.querySelector("#events tbody");
  const checkpointsBody = document.querySelector("#checkpoints tbody");

  function cell(row, text, cls) {
    const td = row.insertCell();
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }

  function fmt(v) {
    return typeof v === "number" ? Number(v.toPrecision(6)).toString() : "";
  }

  function addEvent(event) {
    const row = eventsBody.insertRow(0);  // newest first
    row.className = "level-" + event.level;
    row.dataset.type = event.type;
    cell(row, new Date(event.created_at * 1000).toISOString().replace("T", " ").slice(0, 19), "mono muted");
    cell(row, event.level);
    cell(row, event.message);
    if (eventsBody.rows.length > MAX_LOG_ROWS) eventsBody.deleteRow(-1);  // keep the page light on long jobs
    eventsBody.parentElement.dataset.count = String(eventsBody.rows.length);
  }

  function addCheckpoint(data, createdAt) {
    const id = data.checkpoint_id;
    if (!id || checkpointsBody.querySelector(`tr[data-checkpoint-id="${CSS.escape(id)}"]`)) return;
    const metrics = byStep.get(data.step) || {};
    const row = checkpointsBody.insertRow(0);
    row.dataset.checkpointId = id;
    cell(row, String(data.step));
    cell(row, new Date(createdAt * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC");
    cell(row, fmt(metrics.train_loss));
    cell(row, fmt(metrics.ipo_margin));
    const link = document.createElement("a");
    link.href = `/jobs/${encodeURIComponent(jobId)}/checkpoints/${encodeURIComponent(id)}/download`;
    link.textContent = "download";
    link.setAttribute("download", "");
    row.insertCell().appendChild(link);
  }

  function handle(event) {
    addEvent(event);
    if (event.type === "metrics" && event.data) addMetrics(event.data);
    else if (event.data && event.data.checkpoint_id) addCheckpoint(event.data, event.created_at);
  }

  const streamState = document.getElementById("stream-state");
  function say(text) {
    streamState.textContent = text;
  }

  function connect() {
    const source = new EventSource(root.dataset.streamUrl);
    source.addEventListener("fine_tuning.job.event", (e) => handle(JSON.parse(e.data)));
    source.addEventListener("done", () => {
      source.close();
      say(TERMINAL.has(root.dataset.status) ? "" : "the job has finished");
    });
    source.onopen = () => say(TERMINAL.has(root.dataset.status) ? "" : "live");
    source.onerror = () => {
      // EventSource reconnects by itself (sending Last-Event-ID) unless the server refused it.
      say(source.readyState === EventSource.CLOSED ? "live updates stopped (reload the page, or log in again)"
                                                    : "reconnecting...");
    };
  }

  async function pollStatus() {
    try {
      const r = await fetch(root.dataset.statusUrl, { headers: { Accept: "application/json" }, cache: "no-store" });
      if (!r.ok) return;
      const s = await r.json();
      const progress = document.getElementById("job-progress");
      if (s.total_steps) progress.textContent = `step ${s.step || 0}/${s.total_steps}`;
      if (s.status !== root.dataset.status) window.location.reload();  // buttons, results, checkpoints
    } catch (_) {
      /* the next poll retries */
    }
  }

  for (const spec of SPECS) charts.push(makeChart(spec));
  window.addEventListener("resize", () => {
    for (const c of charts) c.plot.setSize({ width: Math.max(c.el.clientWidth, 280), height: 220 });
  });
  window.ipoDashboard = { byStep, charts, redraw };
  connect();
  if (root.dataset.terminal !== "true") setInterval(pollStatus, 2000);
})();
