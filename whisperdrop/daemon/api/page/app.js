// whisperdrop's page. It reads the daemon's JSON (/v1/jobs, /v1/hosts, /v1/throughput) every few
// seconds with the same token as any API client, and uploads through POST /v1/jobs. No library.
"use strict";

const TOKEN_KEY = "whisperdrop.token";
const POLL_MS = 2000;
const HIDDEN_POLL_MS = 30000;  // while the tab is in the background
const PLOT_MS = 60000;
const FORMATS = ["json", "srt", "vtt", "txt"];
const $ = (id) => document.getElementById(id);

let polling = null;       // the timer of the next refresh
let plottedAt = 0;        // when the throughput was last drawn
let finishedSeen = "";    // the finished jobs last drawn, to redraw the plot when one finishes
let shown = null;         // the job whose transcript is shown
let cues = [];            // its segments: {start, end, item}

// ---------------------------------------------------------------- talking to the daemon

class Refused extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function headers() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: "Bearer " + token } : {};
}

async function messageOf(response) {
  try { return (await response.json()).error.message; } catch { return `HTTP ${response.status}`; }
}

async function get(path) {
  const response = await fetch(path, { headers: headers(), cache: "no-store" });
  if (!response.ok) throw new Refused(response.status, await messageOf(response));
  return response;
}

async function refresh() {
  clearTimeout(polling);
  try {
    const [jobs, hosts] = await Promise.all([get("/v1/jobs?hours=24"), get("/v1/hosts")].map(
      (answer) => answer.then((response) => response.json())));
    $("login").hidden = true;
    $("main").hidden = false;
    drawJobs(jobs.jobs);
    drawHosts(hosts);
    drawSummary(jobs, hosts);
    if (shown === null) followHash();
    const finished = jobs.jobs.filter((job) => job.status === "done").map((job) => job.job_id).join();
    if (Date.now() - plottedAt > PLOT_MS || finished !== finishedSeen) {
      finishedSeen = finished;
      plottedAt = Date.now();
      drawPlot(await (await get("/v1/throughput?hours=24")).json());
    }
  } catch (error) {
    if (error.status === 401 || error.status === 403) return askForToken(error);  // polling waits for it
    $("summary").textContent = "Cannot reach the daemon: " + error.message;
  }
  polling = setTimeout(refresh, document.hidden ? HIDDEN_POLL_MS : POLL_MS);
}

function askForToken(error) {
  const hadToken = sessionStorage.getItem(TOKEN_KEY) !== null;
  $("main").hidden = true;
  $("login").hidden = false;
  $("summary").textContent = "Waiting for the token.";
  $("login-why").textContent = (hadToken ? "That token was refused: " : "") + error.message;
  $("login-why").dataset.status = error.status;
  $("token").focus();
}

// ---------------------------------------------------------------- small helpers

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.dataset[key.slice(5).replace(/-(\w)/g, (_, c) => c.toUpperCase())] = value;
    else node[key] = value;
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

function clock(seconds) {
  const whole = Math.max(0, Math.floor(seconds));
  const hours = Math.floor(whole / 3600), minutes = Math.floor(whole % 3600 / 60), rest = whole % 60;
  const two = (value) => String(value).padStart(2, "0");
  return hours ? `${hours}:${two(minutes)}:${two(rest)}` : `${minutes}:${two(rest)}`;
}

function ago(epoch, now) {
  const seconds = Math.max(0, now - epoch);
  if (seconds < 90) return `${Math.round(seconds)} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  return `${(seconds / 3600).toFixed(1)} h ago`;
}

function amount(hours) {  // hours of audio for people: "1.5 h", "12 min", "40 s"
  if (hours >= 1) return `${hours.toFixed(1)} h`;
  if (hours >= 1 / 60) return `${Math.round(hours * 60)} min`;
  return `${Math.round(hours * 3600)} s`;
}

function where(job) {
  if (job.route === "remote") return job.host || "GPU host";
  if (job.route === "local") return job.fallback_reason ? "this machine (fallback)" : "this machine";
  return job.host || "";
}

function bar(fraction) {
  if (fraction === null) return null;  // not known yet (queued, waiting, extracting)
  const meter = el("div", { class: "bar" }, el("span"));
  meter.firstChild.style.width = `${Math.round(fraction * 100)}%`;
  return meter;
}

// ---------------------------------------------------------------- jobs

let jobsDrawn = "";  // what the job tables show: redrawn when it changes (or the times shown age)

function drawJobs(jobs) {
  const now = Date.now() / 1000;
  const drawn = JSON.stringify([jobs, shown, Math.floor(now / 15)]);
  if (drawn === jobsDrawn) return;
  jobsDrawn = drawn;
  const active = jobs.filter((job) => job.status === "queued" || job.status === "running");
  const finished = jobs.filter((job) => job.status === "done" || job.status === "failed");
  $("active").replaceChildren(...(active.length ? active.map((job) => activeRow(job, now))
    : [el("tr", { class: "empty" }, el("td", { colSpan: 5 }, "Nothing queued or running."))]));
  $("finished").replaceChildren(...(finished.length ? finished.map((job) => finishedRow(job, now))
    : [el("tr", { class: "empty" }, el("td", { colSpan: 5 }, "None yet."))]));
}

function rowOf(job, ...cells) {
  return el("tr", { "data-job": job.job_id, "data-status": job.status, "data-stage": job.stage,
                    class: job.job_id === shown ? "selected" : "" }, ...cells);
}

function activeRow(job, now) {
  const progress = job.progress || {};
  const fraction = progress.transcribe ?? progress.upload ?? null;
  const label = fraction === null ? "" : `${Math.round(fraction * 100)}%` +
    (progress.done_s != null && progress.duration_s ? ` · ${clock(progress.done_s)} of ${clock(progress.duration_s)}` : "");
  const problem = job.error ? el("div", { class: "error small" }, job.error) : null;
  return rowOf(job, el("td", { class: "name" }, job.name), el("td", { class: "step" }, job.step, problem),
    el("td", {}, bar(fraction), el("span", { class: "small muted" }, label)),
    el("td", { title: job.fallback_reason || "" }, where(job)), el("td", { class: "muted" }, ago(job.created_at, now)));
}

function finishedRow(job, now) {
  const name = job.status === "done"
    ? el("a", { href: `#job=${job.job_id}`, class: "name" }, job.name) : el("span", { class: "name" }, job.name);
  const outcome = job.status === "done" ? el("td", { class: "done" }, "done")
    : el("td", { class: "failed" }, "failed", el("div", { class: "error small" }, job.error || ""),
      job.hint ? el("div", { class: "hint small" }, job.hint) : null);
  const speed = job.real_time_factor ? ` · RTF ${job.real_time_factor.toFixed(2)}` : "";
  return rowOf(job, el("td", {}, name), outcome,
    el("td", {}, job.duration ? clock(job.duration) + speed : ""), el("td", { title: job.fallback_reason || "" }, where(job)),
    el("td", { class: "muted" }, job.finished_at ? ago(job.finished_at, now) : ""));
}

function drawSummary(jobs, hosts) {
  const running = jobs.jobs.filter((job) => job.status === "running").length;
  const queued = jobs.jobs.filter((job) => job.status === "queued").length;
  const up = hosts.hosts.filter((host) => host.state === "up").length;
  const parts = [`${running} running`, `${queued} queued`,
    hosts.hosts.length ? `${up} of ${hosts.hosts.length} GPU hosts up` : "no GPU host: every job runs here",
    `updated ${new Date().toLocaleTimeString()}`];
  $("summary").textContent = parts.join(" · ");
}

// ---------------------------------------------------------------- hosts

function drawHosts(answer) {
  const cards = answer.hosts.map((host) => {
    const state = { up: "up", down: "down", unchecked: "not contacted yet" }[host.state];
    const why = host.state === "down"
      ? el("p", { class: "error small" }, host.last_error || "down",
        host.retry_in_s ? ` (next try in ${Math.round(host.retry_in_s)} s)` : "") : null;
    const runners = host.runners.map((runner) => el("li", {},
      el("strong", {}, runner.name), ` ${runner.state || ""} · ${runner.gpu || runner.device || ""} · ${runner.model || ""}`,
      ` · queue ${runner.queue_length ?? 0} · ${runner.jobs_done ?? 0} done`));
    const runnersNote = el("p", { class: "muted small" }, host.state === "up"
      ? `Checked ${Math.round(host.checked_age_s ?? 0)} s ago · ${host.in_flight} of our jobs there now`
      : runners.length ? "Runners when it was last reached:" : "No live runner seen.");
    return el("div", { class: "host", "data-host": host.name, "data-state": host.state },
      el("h3", {}, host.name, " ", el("span", { class: `badge ${host.state}` }, state)), why, runnersNote,
      runners.length ? el("ul", { class: "runners small" + (host.state === "up" ? "" : " muted") }, ...runners) : null);
  });
  const local = answer.local;
  cards.push(el("div", { class: "host local", "data-host": "local" },
    el("h3", {}, "This machine ", el("span", { class: `badge ${local.role === "off" ? "unchecked" : "up"}` },
      local.role === "every job" ? "every job" : local.role === "fallback" ? "fallback" : "off")),
    el("p", { class: "small muted" }, `${local.model} on ${local.device}`)));
  $("hosts").replaceChildren(...cards);
}

// ---------------------------------------------------------------- throughput plot (inline SVG)

const SVG = "http://www.w3.org/2000/svg";
const ROUTE_COLOURS = { remote: "var(--remote)", local: "var(--local)" };

function svg(tag, attributes, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function drawPlot(answer) {
  const plot = $("plot");
  const left = 40, right = 380, top = 12, bottom = 170;
  const bins = answer.bins;
  const hoursMax = Math.max(1 / 60, ...bins.map((bin) => bin.audio_hours)) * 1.1;
  const rtfs = bins.flatMap((bin) => Object.values(bin.real_time_factor).filter((value) => value !== null));
  const rtfMax = Math.max(0.1, ...rtfs) * 1.1;
  const step = (right - left) / bins.length;
  const x = (index) => left + index * step;
  const nodes = [
    svg("line", { x1: left, y1: bottom, x2: right, y2: bottom, class: "axis" }),
    svg("text", { x: left - 4, y: top + 4, class: "tick end" }, amount(hoursMax)),
    svg("text", { x: left - 4, y: bottom, class: "tick end" }, "0"),
    answer.routes.length ? svg("text", { x: right + 4, y: top + 4, class: "tick" }, rtfMax.toFixed(2)) : null,
    svg("text", { x: 4, y: bottom + 26, class: "tick" }, "audio per hour"),
    svg("text", { x: right + 36, y: bottom + 26, class: "tick end" }, "RTF"),
  ];
  bins.forEach((bin, index) => {
    const height = (bottom - top) * bin.audio_hours / hoursMax;
    const hour = new Date(bin.start * 1000).getHours();
    const rect = svg("rect", { x: x(index) + 1, y: bottom - height, width: step - 2, height, class: "hours" });
    rect.append(svg("title", {}, `${hour}:00 · ${bin.jobs} jobs · ${amount(bin.audio_hours)} of audio`));
    nodes.push(rect);
    if (index % 6 === 0) nodes.push(svg("text", { x: x(index), y: bottom + 12, class: "tick" }, `${hour}:00`));
  });
  for (const route of answer.routes) {
    const points = bins.map((bin, index) => [index, bin.real_time_factor[route]])
      .filter(([, value]) => value !== null && value !== undefined)
      .map(([index, value]) => `${x(index) + step / 2},${bottom - (bottom - top) * value / rtfMax}`);
    if (!points.length) continue;
    nodes.push(svg("polyline", { points: points.join(" "), class: "rtf", stroke: ROUTE_COLOURS[route] || "currentColor",
                                 "data-route": route }));
    for (const point of points) {
      const [cx, cy] = point.split(",");
      nodes.push(svg("circle", { cx, cy, r: 2.5, fill: ROUTE_COLOURS[route] || "currentColor" }));
    }
  }
  plot.replaceChildren(...nodes.filter((node) => node !== null));
  const done = bins.reduce((sum, bin) => sum + bin.jobs, 0);
  $("plot-legend").replaceChildren(el("span", { class: "key hours" }, "audio transcribed per hour"),
    ...answer.routes.map((route) => el("span", { class: `key ${route}` }, `real-time factor, ${route}`)),
    el("span", { class: "muted" }, `${done} ${done === 1 ? "job" : "jobs"} done`));
}

// ---------------------------------------------------------------- a finished job's transcript

async function showTranscript(jobId) {
  if (jobId === shown) return;
  shown = jobId;
  const player = $("player");
  if (player.src) URL.revokeObjectURL(player.src);
  player.removeAttribute("src");
  $("transcript").hidden = false;
  $("cues").replaceChildren();
  for (const row of document.querySelectorAll("tr[data-job]")) row.classList.toggle("selected", row.dataset.job === jobId);
  try {
    const result = await (await get(`/v1/jobs/${jobId}/transcript.json`)).json();
    const name = document.querySelector(`tr[data-job="${jobId}"] .name`)?.textContent || jobId.slice(0, 12);
    $("transcript-title").textContent = name;
    $("transcript-links").replaceChildren(...FORMATS.map((format) => download(jobId, name, format)));
    cues = (result.segments || []).map((segment) => {
      const item = el("li", { "data-start": segment.start },
        el("button", { type: "button", class: "time", title: "Play from here" }, clock(segment.start)),
        el("span", {}, segment.text.trim()));
      item.firstChild.addEventListener("click", () => { player.currentTime = segment.start; player.play(); });
      return { start: segment.start, end: segment.end, item };
    });
    $("cues").replaceChildren(...cues.map((cue) => cue.item));
  } catch (error) {
    $("cues").replaceChildren(el("li", { class: "error" }, error.message));
    return;
  }
  try {
    const audio = await (await get(`/v1/jobs/${jobId}/audio`)).blob();
    if (shown === jobId) player.src = URL.createObjectURL(audio);
    $("audio-note").hidden = true;
  } catch (error) {
    $("audio-note").hidden = false;
    $("audio-note").textContent = error.message;
  }
}

function download(jobId, name, format) {
  const link = el("a", { href: `/v1/jobs/${jobId}/transcript.${format}`, "data-format": format }, format.toUpperCase());
  link.addEventListener("click", async (event) => {  // fetched with the token, then saved from a blob
    event.preventDefault();
    const blob = await (await get(link.getAttribute("href"))).blob();
    const saved = el("a", { href: URL.createObjectURL(blob), download: `${name.replace(/\.[^.]*$/, "")}.${format}` });
    saved.click();
    setTimeout(() => URL.revokeObjectURL(saved.href), 10000);
  });
  return link;
}

function highlight() {
  const time = $("player").currentTime;
  let current = null;
  for (const cue of cues) if (cue.start <= time) current = cue;
  if (current && time > current.end + 1) current = null;  // a pause between segments
  for (const cue of cues) cue.item.classList.toggle("now", cue === current);
  if (current) current.item.scrollIntoView({ block: "nearest" });
}

function followHash() {
  const match = location.hash.match(/^#job=([0-9a-f]{64})$/);
  if (match) showTranscript(match[1]);
}

// ---------------------------------------------------------------- uploads

let uploading = Promise.resolve();  // one upload at a time, in the order the files came

function upload(file) {
  const status = el("span", { class: "small muted" }, "waiting");
  const meter = el("progress", { max: 1, value: 0 });
  const item = el("li", { "data-file": file.name }, el("strong", {}, file.name), " ", meter, " ", status);
  $("uploads").prepend(item);
  const fail = (message) => {
    item.dataset.state = "failed";
    meter.remove();
    status.className = "error small";
    status.textContent = message;
  };
  const limitMb = Number(document.body.dataset.maxUploadMb);
  if (file.size > limitMb * 1e6) {  // the API's own limit and words, before sending what it would refuse
    fail(`the upload (${(file.size / 1e6).toFixed(1)} MB) is larger than api.max_upload_mb (${limitMb} MB); ` +
         "send a smaller file, or raise api.max_upload_mb");
    return;
  }
  uploading = uploading.then(() => new Promise((done) => {
    const request = new XMLHttpRequest();
    request.open("POST", "/v1/jobs");
    for (const [key, value] of Object.entries(headers())) request.setRequestHeader(key, value);
    request.responseType = "json";
    request.upload.onprogress = (event) => {
      if (event.lengthComputable) meter.value = event.loaded / event.total;
      status.textContent = "uploading";
    };
    request.onload = () => {
      if (request.status === 202) {
        item.dataset.state = "accepted";
        item.dataset.job = request.response.job_id;
        meter.value = 1;
        status.textContent = request.response.duplicate ? "already a job (listed below)" : "became a job (listed below)";
        refresh();
      } else {
        fail(request.response?.error?.message || `HTTP ${request.status}`);
      }
      done();
    };
    request.onerror = () => { fail("the connection closed before the daemon answered"); done(); };
    const form = new FormData();
    form.append("file", file, file.name);
    request.send(form);
  }));
}

function setUpDropZone() {
  const zone = $("drop");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    [...event.dataTransfer.files].forEach(upload);
  });
  $("files").addEventListener("change", (event) => {
    [...event.target.files].forEach(upload);
    event.target.value = "";
  });
}

// ---------------------------------------------------------------- start

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    refresh();
  });
  $("player").addEventListener("timeupdate", highlight);
  $("player").addEventListener("seeked", highlight);
  window.addEventListener("hashchange", followHash);
  document.addEventListener("visibilitychange", () => { if (!document.hidden && !$("main").hidden) refresh(); });
  setUpDropZone();
  refresh();
});
