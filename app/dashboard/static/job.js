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
    // worker/training/samples.py: means over the sampled pairs; both falling = likelihood displacement
    { id: "chart-sample-logps", series: [["samples/policy_logp_chosen", "policy chosen", BLUE],
                                         ["samples/policy_logp_rejected", "policy rejected", RED],
                                         ["samples/reference_logp_chosen", "reference chosen", BLUE, true],
                                         ["samples/reference_logp_rejected", "reference rejected", RED, true]] },
  ];
  const SAMPLE_KEYS = new Set(["samples/policy_logp_chosen", "samples/policy_logp_rejected", "samples/reference_logp_chosen",
                               "samples/reference_logp_rejected", "samples/changed_fraction", "samples/seconds"]);
  const PALETTE = [BLUE, RED, GREEN, "#7c3aed", "#d97706", "#0891b2", "#be185d", GREY];

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

  let graderChart = null;
  function addGraderChart(data) {
    // Grader scores (samples/<name> and samples/<name>_reference): the chart is made from the first report.
    const names = Object.keys(data).filter((k) => k.startsWith("samples/") && !SAMPLE_KEYS.has(k)
                                                  && !k.endsWith("_reference")).sort();
    if (graderChart || names.length === 0) return;
    const series = [];
    names.forEach((k, i) => {
      const label = k.slice("samples/".length), colour = PALETTE[i % PALETTE.length];
      series.push([k, label, colour], [k + "_reference", label + " (reference)", colour, true]);
    });
    document.getElementById("figure-graders").hidden = false;
    // [0, 1] at least; wider when a score_model grader's range is (its scores are clamped to that range)
    const range = (u, min, max) => [Math.min(0, min === null ? 0 : min), Math.max(1, max === null ? 1 : max)];
    graderChart = makeChart({ id: "chart-graders", range, series });
    charts.push(graderChart);
  }

  function addMetrics(data) {
    const step = number(data.step);
    if (step === null) return;
    addGraderChart(data);
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

  // Samples: one entry per sampled step (a resumed attempt's later report of a step replaces it).
  const samplesByStep = new Map();
  const samplesRoot = document.getElementById("samples");
  const stepSelect = document.getElementById("samples-step");
  const samplesBody = document.querySelector("#samples-table tbody");
  let followLatest = true;

  function lines(td, parts) {  // text only (textContent): replies are untrusted model output
    parts.forEach(([label, text], i) => {
      if (i > 0) td.appendChild(document.createElement("br"));
      if (label) {
        const b = document.createElement("span");
        b.className = "muted";
        b.textContent = label + " ";
        td.appendChild(b);
      }
      td.appendChild(document.createTextNode(text));
    });
  }

  function showSamples(step) {
    const data = samplesByStep.get(step);
    if (!data) return;
    samplesBody.replaceChildren();
    document.getElementById("samples-source").textContent = `step ${step}: ${data.samples.length} prompts from the ${data.source}`;
    for (const s of data.samples) {
      const row = samplesBody.insertRow();
      row.className = s.policy_reply === s.reference_reply ? "same" : "changed";
      cell(row, s.prompt);
      lines(row.insertCell(), [["chosen:", s.chosen], ["rejected:", s.rejected]]);
      cell(row, s.reference_reply, "reference");
      cell(row, s.policy_reply, "policy");
      lines(row.insertCell(), [["chosen:", `${fmt(s.reference_logp_chosen)} → ${fmt(s.policy_logp_chosen)}`],
                               ["rejected:", `${fmt(s.reference_logp_rejected)} → ${fmt(s.policy_logp_rejected)}`]]);
    }
    stepSelect.value = String(step);
    samplesRoot.dataset.shownStep = String(step);
  }

  function addSamples(data) {
    const step = number(data.step);
    if (step === null || !Array.isArray(data.samples)) return;
    samplesByStep.set(step, data);
    const steps = Array.from(samplesByStep.keys()).sort((a, b) => a - b);
    stepSelect.replaceChildren(...steps.map((s) => new Option(String(s), String(s))));
    samplesRoot.dataset.steps = String(steps.length);
    document.getElementById("samples-empty").hidden = true;
    document.getElementById("samples-step-label").hidden = false;
    document.getElementById("samples-table").hidden = false;
    showSamples(followLatest ? steps[steps.length - 1] : number(Number(stepSelect.dataset.chosen)));
  }

  stepSelect.addEventListener("change", () => {
    const steps = Array.from(samplesByStep.keys()).sort((a, b) => a - b);
    followLatest = Number(stepSelect.value) === steps[steps.length - 1];
    stepSelect.dataset.chosen = stepSelect.value;
    showSamples(Number(stepSelect.value));
  });

  function handle(event) {
    addEvent(event);
    if (event.type === "metrics" && event.data) addMetrics(event.data);
    else if (event.data && event.data.samples) addSamples(event.data);
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
