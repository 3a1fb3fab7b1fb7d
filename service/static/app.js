// CTSR web page: talks only to the public API on this origin (POST /upscale, GET /jobs/{id}, results).
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 400;
const state = { file: null, inputUrl: null, job: null, jobInput: null, jobName: "", results: [], current: 0, timer: null };

function headers() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// An API refusal ({"error": {"code", "message"}}) as one readable line, with Retry-After when given.
async function apiError(response) {
  let message = `${response.status} ${response.statusText}`;
  let code = "";
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || "";
    }
  } catch (_) { /* not JSON: keep the status line */ }
  const retry = response.headers.get("Retry-After");
  let text = code ? `${message} (${code})` : message;
  if (retry) text += ` — retry in ${retry} s`;
  return text;
}

function setBusy(busy) {
  $("submit").disabled = busy;
  $("cancel").hidden = !busy;
}

function chooseFile(file) {
  if (!file) return;
  state.file = file;
  if (state.inputUrl && state.inputUrl !== state.jobInput) URL.revokeObjectURL(state.inputUrl);
  state.inputUrl = URL.createObjectURL(file);
  const preview = $("preview");
  preview.src = state.inputUrl;
  preview.hidden = false;
  preview.onerror = () => { preview.hidden = true; };
  $("drop-text").textContent = `${file.name} (${Math.round(file.size / 1024)} KiB) — drop or choose another`;
  showError("");
}

function alphas() {
  if ($("mode-single").checked) return [$("alpha").value];
  return $("alphas").value.split(/[\s,;]+/).filter(Boolean);
}

function label(alpha) {
  return Number(alpha).toFixed(2).replace(/\.?0+$/, "") || "0";
}

async function submit(event) {
  event.preventDefault();
  showError("");
  if (!state.file) {
    showError("Choose an image first.");
    return;
  }
  stopPolling();
  clearResults();
  if (state.jobInput && state.jobInput !== state.inputUrl) URL.revokeObjectURL(state.jobInput);
  state.jobInput = state.inputUrl;  // the "before" image of this job, even if another file is chosen later
  state.jobName = state.file.name;
  const form = new FormData();
  form.append("image", state.file, state.file.name);
  for (const alpha of alphas()) form.append("alpha", alpha);
  form.append("format", $("format").value);
  form.append("color_fix", $("color-fix").value);
  setBusy(true);
  setStatus("Uploading…", 0);
  let response;
  try {
    response = await fetch("/upscale", { method: "POST", body: form, headers: headers() });
  } catch (err) {
    // a server that refuses a too-large body early may close the connection before the browser reads the answer
    return fail(`The upload failed (${err.message}): the connection was closed; the file may be too large.`);
  }
  if (response.status !== 202) return fail(await apiError(response));
  const body = await response.json();
  state.job = body.id;
  poll();
}

function setStatus(text, progress) {
  $("job").hidden = false;
  $("status").textContent = text;
  const bar = $("progress");
  if (progress === null) bar.removeAttribute("value");
  else bar.value = progress;
}

function fail(message) {
  setBusy(false);
  $("job").hidden = true;
  showError(message);
}

function stopPolling() {
  if (state.timer) clearTimeout(state.timer);
  state.timer = null;
}

async function poll() {
  const id = state.job;
  if (!id) return;
  let response;
  try {
    response = await fetch(`/jobs/${id}`, { headers: headers(), cache: "no-store" });
  } catch (err) {
    state.timer = setTimeout(poll, POLL_MS * 3);  // a network blip: keep trying
    return;
  }
  if (id !== state.job) return;
  if (response.status === 429 || response.status === 503) {  // rate limited or the job store blinked: wait, go on
    const wait = Number(response.headers.get("Retry-After")) || 5;
    showError(`${await apiError(response)}; still waiting for the job…`);
    state.timer = setTimeout(poll, wait * 1000);
    return;
  }
  if (!response.ok) return fail(await apiError(response));
  showError("");
  const job = await response.json();
  switch (job.status) {
    case "queued":
      setStatus(`Queued${job.queue_position != null ? ` (position ${job.queue_position + 1})` : ""}…`, null);
      break;
    case "started":
      setStatus(`Upscaling… ${Math.round((job.progress || 0) * 100)} %`, job.progress || 0);
      break;
    case "finished":
      setStatus(`Finished: ${job.input.width}×${job.input.height} → ${job.output.width}×${job.output.height}`, 1);
      return loadResults(job);
    case "failed":
      return fail(`The job failed: ${(job.error && job.error.message) || "unknown error"}`);
    case "expired":
      return fail("The job expired before it ran (the queue was too long); submit it again.");
    case "canceled":
      return fail("The job was canceled.");
    default:
      break;
  }
  state.timer = setTimeout(poll, POLL_MS);
}

async function loadResults(job) {
  const results = [];
  for (const alpha of job.alphas) {
    const response = await fetch(`/jobs/${job.id}/result?alpha=${encodeURIComponent(alpha)}`, { headers: headers() });
    if (!response.ok) return fail(await apiError(response));
    const blob = await response.blob();
    results.push({ alpha: label(alpha), url: URL.createObjectURL(blob), type: blob.type });
  }
  if (job.id !== state.job) return;
  state.results = results;
  setBusy(false);
  showResults();
}

function clearResults() {
  for (const r of state.results) URL.revokeObjectURL(r.url);
  state.results = [];
  $("result").hidden = true;
  $("gallery").replaceChildren();
}

function showResults() {
  const gallery = $("gallery");
  gallery.replaceChildren();
  state.results.forEach((r, i) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = r.url;
    img.alt = `output at alpha ${r.alpha}`;
    const caption = document.createElement("figcaption");
    caption.textContent = `α = ${r.alpha}`;
    figure.append(img, caption);
    figure.addEventListener("click", () => select(i));
    gallery.append(figure);
  });
  gallery.hidden = state.results.length < 2;
  $("prev").hidden = $("next").hidden = state.results.length < 2;
  $("result").hidden = false;
  select(0);
}

function select(index) {
  const n = state.results.length;
  if (!n) return;
  state.current = ((index % n) + n) % n;
  const r = state.results[state.current];
  $("after").src = r.url;
  $("before").src = state.jobInput;
  $("result-label").textContent = n > 1 ? `α = ${r.alpha} (${state.current + 1} of ${n})` : `α = ${r.alpha}`;
  const ext = { "image/png": "png", "image/webp": "webp", "image/jpeg": "jpg" }[r.type] || "img";
  const stem = (state.jobName.replace(/\.[^.]*$/, "") || "image").slice(0, 80);
  const link = $("download");
  link.href = r.url;
  link.download = `${stem}_x4_alpha${r.alpha}.${ext}`;
  [...$("gallery").children].forEach((f, i) => f.classList.toggle("active", i === state.current));
  applyZoom();
}

function applyZoom() {
  const zoom = $("zoom").value;
  const compare = $("compare");
  const img = $("after");
  if (zoom === "fit" || !img.naturalWidth) {
    compare.style.width = "";
  } else {
    compare.style.width = `${img.naturalWidth * Number(zoom)}px`;
  }
  compare.classList.toggle("pixelated", zoom !== "fit" && Number(zoom) > 1);
}

async function cancel() {
  const id = state.job;
  stopPolling();
  state.job = null;
  setBusy(false);
  $("job").hidden = true;
  if (!id) return;
  const response = await fetch(`/jobs/${id}`, { method: "DELETE", headers: headers() });
  if (!response.ok && response.status !== 409) showError(await apiError(response));
}

function init() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => chooseFile(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    chooseFile(e.dataTransfer.files[0]);
  });
  const alpha = $("alpha");
  const showAlpha = () => { $("alpha-value").value = Number(alpha.value).toFixed(2); };
  alpha.addEventListener("input", showAlpha);
  showAlpha();
  const mode = () => {
    const sweep = $("mode-sweep").checked;
    $("single-row").hidden = sweep;
    $("sweep-row").hidden = !sweep;
  };
  $("mode-single").addEventListener("change", mode);
  $("mode-sweep").addEventListener("change", mode);
  mode();
  $("form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  $("split").addEventListener("input", (e) => $("compare").style.setProperty("--split", `${e.target.value}%`));
  $("zoom").addEventListener("change", applyZoom);
  $("after").addEventListener("load", applyZoom);
  $("prev").addEventListener("click", () => select(state.current - 1));
  $("next").addEventListener("click", () => select(state.current + 1));
  document.addEventListener("keydown", (e) => {
    if (state.results.length < 2 || e.target.closest("input, select, textarea")) return;
    if (e.key === "ArrowLeft") select(state.current - 1);
    if (e.key === "ArrowRight") select(state.current + 1);
  });
}

document.addEventListener("DOMContentLoaded", init);
