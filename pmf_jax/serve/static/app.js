// The page: source, target pose (joint editor, doodle, upload), settings, generation through the same HTTP API
// that other clients use (POST /api/retarget), progress (GET /api/progress/{job}) and the results gallery.

import { Doodle } from "./doodle.js";
import { JointEditor } from "./editor.js";

const $ = (id) => document.getElementById(id);
const state = { info: null, source: null, sourceImage: null, tab: "joints", result: null };

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) {
    const retry = response.headers.get("Retry-After");
    throw new Error(body.error + (retry ? ` (retry after ${retry} s)` : ""));
  }
  return body;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function fillSelect(select, values, selected) {
  select.replaceChildren(...values.map((v) => new Option(v, v, false, v === selected)));
}

async function start() {
  const info = await api("/api/info");
  state.info = info;
  $("model-line").textContent = `${info.model}: mode ${info.mode}, ${info.size[1]}x${info.size[0]}, ` +
    `${info.sampling.steps} ${info.sampling.scheduler} steps`;
  fillSelect($("mode"), info.modes, info.mode);
  fillSelect($("scheduler"), info.schedulers, info.sampling.scheduler);
  $("steps").value = info.sampling.steps;
  $("steps").max = info.limits.max_steps;
  $("num_images").max = info.limits.max_images;
  $("seed").value = info.seed;
  $("guidance_scale").value = info.sampling.guidance_scale;
  $("negative_prompt").value = info.negative_prompt;
  for (const id of ["prompt-label", "negative-label", "guidance-label"]) $(id).hidden = !info.text_encoder;
  $("pose-detect").disabled = !info.detector;
  if (info.examples.length) {
    $("example-label").hidden = false;
    $("example").append(...info.examples.map((name) => new Option(name, name)));
  }
  state.editor = new JointEditor($("editor"), info.skeleton, showKeypoints);
  state.doodle = new Doodle($("doodle"));
  setFrame(info.size[1], info.size[0], null);
  window.pmf = state;  // for the browser tests and the curious
  document.body.dataset.ready = "true";
}

function setFrame(width, height, image) {
  state.editor.setFrame(width, height, image);
  state.doodle.setFrame(width, height, image);
}

function showKeypoints(editor) {
  $("keypoints-json").textContent = JSON.stringify(editor.openPose());
  const list = $("joint-list");
  if (!list.children.length) {
    state.info.skeleton.names.forEach((name, j) => {
      const box = Object.assign(document.createElement("input"), { type: "checkbox", id: `joint-${j}` });
      box.addEventListener("change", () => editor.setVisible(j, box.checked));
      const label = document.createElement("label");
      label.append(box, ` ${name}`);
      list.append(label);
    });
  }
  editor.visible.forEach((v, j) => { $(`joint-${j}`).checked = v; });
}

function loadSource(source, url) {
  const image = new Image();
  image.onload = () => {
    state.source = source;
    state.sourceImage = image;
    $("source-line").textContent = `${image.naturalWidth}x${image.naturalHeight} pixels`;
    setFrame(image.naturalWidth, image.naturalHeight, image);
  };
  image.onerror = () => showError("this file is not an image the browser can show");
  image.src = url;
}

function selectTab(tab) {
  state.tab = tab;
  for (const name of ["joints", "doodle", "upload"]) {
    $(`panel-${name}`).hidden = name !== tab;
    $(`tab-${name}`).classList.toggle("active", name === tab);
  }
}

async function fitDoodle() {
  showError("");
  if (!state.doodle.strokes.length) return showError("draw a stick figure first");
  try {
    const body = JSON.stringify(state.doodle.request());
    const result = await api("/api/fit-doodle", {
      method: "POST", headers: { "Content-Type": "application/json" }, body });
    const flat = result.pose.people[0].pose_keypoints_2d;
    state.editor.setKeypoints(state.info.skeleton.names.map((_, j) => flat.slice(3 * j, 3 * j + 3)));
    $("doodle-status").textContent = "Fitted: adjust the joints, then generate.";
    selectTab("joints");
  } catch (err) {
    showError(err.message);
  }
}

async function detectPose() {
  showError("");
  if (!state.source) return showError("choose a source photo first");
  const form = sourceForm(new FormData());
  try {
    const result = await api("/api/detect-pose", { method: "POST", body: form });
    const flat = result.pose.people[0].pose_keypoints_2d;
    state.editor.setKeypoints(state.info.skeleton.names.map((_, j) => flat.slice(3 * j, 3 * j + 3)));
  } catch (err) {
    showError(err.message);
  }
}

function sourceForm(form) {
  if (state.source.file) form.append("source", state.source.file);
  else form.append("example", state.source.example);
  return form;
}

async function generate() {
  showError("");
  if (!state.source) return showError("choose a source photo first");
  const form = sourceForm(new FormData());
  if (state.tab === "upload") {
    const file = $("pose-file").files[0];
    if (!file) return showError("choose a pose file, or use the joint editor");
    form.append("pose", file);
    form.append("pose_kind", $("pose_kind").value);
  } else {
    form.append("pose", JSON.stringify(state.editor.openPose()));
  }
  for (const [key, value] of new FormData($("settings"))) {
    if (value !== "" && !$(key).closest("label").hidden) form.append(key, value);
  }
  form.set("align_skeleton", $("align_skeleton").checked ? "true" : "false");
  const job = `job-${Date.now()}-${Math.random().toString(36).slice(2, 10)}`;
  form.append("job", job);
  state.pending = job;
  $("generate").disabled = true;
  $("progress").value = 0;
  $("status").textContent = "sending…";
  const timer = setInterval(() => followProgress(job), 200);
  try {
    showResult(await api("/api/retarget", { method: "POST", body: form }));
    $("progress").value = 1;
  } catch (err) {
    $("status").textContent = "";
    showError(err.message);
  } finally {
    state.pending = null;
    clearInterval(timer);
    $("generate").disabled = false;
  }
}

async function followProgress(job) {
  const info = await api(`/api/progress/${job}`).catch(() => null);
  if (!info || state.pending !== job) return;
  if (info.state === "queued") $("status").textContent = `waiting (${info.ahead} ahead)`;
  if (info.state === "running" && info.steps) {
    $("progress").value = info.step / info.steps;
    $("status").textContent = `step ${info.step}/${info.steps}`;
  }
}

function download(name, href, label) {
  return Object.assign(document.createElement("a"), { download: name, href, textContent: label || name });
}

function showResult(result) {
  state.result = result;
  const figures = result.images.map((b64, i) => {
    const figure = document.createElement("figure");
    const url = `data:image/png;base64,${b64}`;
    const img = Object.assign(document.createElement("img"), { src: url, className: "result", alt: `result ${i}` });
    const name = `result_${String(i).padStart(2, "0")}.png`;
    figure.append(img, download(name, url));
    return figure;
  });
  $("gallery").replaceChildren(...figures);
  const pose = JSON.stringify(result.pose ?? result.pose_on_output, null, 1);
  $("received-pose").textContent = JSON.stringify(result.pose);
  $("download-pose").href = URL.createObjectURL(new Blob([pose], { type: "application/json" }));
  $("download-skeleton").href = `data:image/png;base64,${result.pose_image}`;
  $("downloads").hidden = false;
  const s = result.settings;
  $("status").textContent = `${s.width}x${s.height}, ${s.steps} steps, seed ${s.seed}: ${result.seconds} s`;
}

$("source-file").addEventListener("change", (e) => {
  const file = e.target.files[0];
  if (!file) return;
  $("example").value = "";
  loadSource({ file }, URL.createObjectURL(file));
});
$("example").addEventListener("change", (e) => {
  if (e.target.value) loadSource({ example: e.target.value }, `/api/examples/${encodeURIComponent(e.target.value)}`);
});
document.querySelectorAll(".tabs button").forEach((b) => b.addEventListener("click", () => selectTab(b.dataset.tab)));
$("pose-standing").addEventListener("click", () => state.editor.standing());
$("pose-detect").addEventListener("click", detectPose);
$("doodle-fit").addEventListener("click", fitDoodle);
$("doodle-clear").addEventListener("click", () => state.doodle.clear());
$("generate").addEventListener("click", generate);
start().catch((err) => showError(`could not reach the server: ${err.message}`));
