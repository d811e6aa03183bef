// chest-ct web page: a client of this server's public KServe v2 REST API, nothing else (serving/page.py).
"use strict";

// Reached as https://host/<prefix>/<name> (KServe reports InferenceService URLs without the trailing slash),
// relative URLs would resolve one level up, outside the prefix: add the slash to the address, without a reload.
if (!location.pathname.endsWith("/")) {
  history.replaceState(null, "", location.pathname + "/" + location.search + location.hash);
}

const $ = (id) => document.getElementById(id);
const HEATMAP = "heatmap";
const OUTPUTS = ["probability", "label", "ood_score", "in_distribution"];
// The colour ramp of the legend in style.css (inferno), bright = more evidence for the positive class.
const RAMP = [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
  [250, 193, 39], [252, 255, 164]];

const state = { name: "", params: {}, heatmap: false, opacity: 0.5, cards: new Set(), queue: Promise.resolve() };

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** The server's reason for a failed response: its JSON "error" (v2 protocol), else the body's text. */
async function failure(resp) {
  const text = await resp.text();
  // A proxy's HTML error page, shortened to its text.
  let reason = text.replace(/<[^>]*>/g, " ").replace(/\s+/g, " ").trim().slice(0, 300) || resp.statusText;
  try { reason = JSON.parse(text).error || reason; } catch (_) { /* not JSON: keep the text */ }
  const retry = resp.headers.get("retry-after");
  return `HTTP ${resp.status}: ${reason}` + (retry ? ` (retry after ${retry} s)` : "");
}

async function getJson(url) {
  const resp = await fetch(url, { headers: { accept: "application/json" }, cache: "no-store" });
  if (!resp.ok) throw new Error(await failure(resp));
  return resp.json();
}

async function loadModel() {
  const status = $("model-status");
  try {
    const names = (await getJson("v2/models")).models || [];
    if (!names.length) throw new Error("the server serves no model (GET v2/models is empty)");
    const meta = await getJson(`v2/models/${encodeURIComponent(names[0])}`);
    const params = meta.parameters || {};
    state.name = meta.name;
    state.params = params;
    state.heatmap = (meta.outputs || []).some((o) => o.name === HEATMAP);
    $("fact-name").textContent = meta.name;
    $("fact-version").textContent = params.mlflow_run_id || (meta.versions || [])[0] || "unversioned";
    $("fact-fingerprint").textContent = params.dataset_fingerprint || "not recorded";
    $("fact-threshold").textContent = `${params.positive_class || "positive"} when probability >= ` +
      `${Number(params.threshold).toFixed(4)}` + (params.threshold_source ? ` (${params.threshold_source})` : "");
    $("fact-size").textContent = `${params.image_size} x ${params.image_size} px`;
    $("fact-heatmap").textContent = state.heatmap
      ? `Grad-CAM, ${params.heatmap_grid_height} x ${params.heatmap_grid_width} grid` +
        (params.heatmap_layer ? ` (${params.heatmap_layer})` : "")
      : "not available: this model was exported without the explain signatures";
    $("model-facts").hidden = false;
    status.textContent = "";
    status.hidden = true;
    $("files").disabled = false;
  } catch (err) {
    status.textContent = `Cannot read the model's metadata: ${err.message}`;
    status.className = "error";
  }
}

function isDicom(name, bytes) {
  const magic = bytes.length > 132 && String.fromCharCode(...bytes.subarray(128, 132)) === "DICM";
  return magic || /\.(dcm|dicom)$/i.test(name);
}

/** A v2 request with the binary tensor extension: JSON header, then the file as one length-prefixed BYTES element. */
function inferBody(input, bytes) {
  const outputs = state.heatmap ? [...OUTPUTS, HEATMAP] : OUTPUTS;
  const header = new TextEncoder().encode(JSON.stringify({
    id: `page-${Date.now()}-${Math.random().toString(16).slice(2, 8)}`,
    inputs: [{ name: input, datatype: "BYTES", shape: [1], parameters: { binary_data_size: bytes.length + 4 } }],
    outputs: outputs.map((name) => ({ name })),
  }));
  const body = new Uint8Array(header.length + 4 + bytes.length);
  body.set(header, 0);
  new DataView(body.buffer).setUint32(header.length, bytes.length, true);
  body.set(bytes, header.length + 4);
  return { body, headerLength: header.length };
}

function newCard(file) {
  const card = el("article", "result");
  card.dataset.state = "waiting";
  card.append(el("h3", "", file.name), el("p", "kind", `${(file.size / 1024).toFixed(1)} KiB`));
  const stateLine = el("p", "state", "Waiting...");
  card.append(stateLine);
  $("results").prepend(card);
  return { card, stateLine, file };
}

function showError(entry, message) {
  entry.card.dataset.state = "error";
  entry.stateLine.remove();
  const box = el("div", "error");
  box.setAttribute("role", "alert");
  box.append(el("p", "", message));
  const retry = el("button", "", "Try again");
  retry.type = "button";
  retry.addEventListener("click", () => { entry.card.remove(); enqueue([entry.file]); });
  box.append(retry);
  entry.card.append(box);
}

async function classify(entry) {
  entry.stateLine.textContent = "Sending to the model...";
  const bytes = new Uint8Array(await entry.file.arrayBuffer());
  const input = isDicom(entry.file.name, bytes) ? "dicom" : "image";
  const { body, headerLength } = inferBody(input, bytes);
  const limit = Number(state.params.max_request_bytes);
  if (limit && body.length > limit) {
    showError(entry, `${entry.file.name} makes a request of ${body.length} bytes; this server accepts at most ` +
      `${limit} bytes per request (max_request_bytes in the model's metadata). Send a smaller image.`);
    return;
  }
  let resp;
  try {
    resp = await fetch(`v2/models/${encodeURIComponent(state.name)}/infer`, {
      method: "POST", body, cache: "no-store",
      headers: { "content-type": "application/octet-stream", "inference-header-content-length": `${headerLength}` },
    });
  } catch (err) {
    showError(entry, `The server could not be reached: ${err.message}`);
    return;
  }
  if (!resp.ok) {
    showError(entry, await failure(resp));
    return;
  }
  const outputs = Object.fromEntries((await resp.json()).outputs.map((o) => [o.name, o]));
  await render(entry, input, outputs);
}

async function render(entry, input, outputs) {
  const probability = outputs.probability.data[0];
  const label = outputs.label.data[0];
  const inside = outputs.in_distribution.data[0];
  const card = entry.card;
  card.dataset.state = "done";
  card.dataset.probability = String(probability);
  card.dataset.label = label;
  if (!inside) card.classList.add("ood");
  entry.stateLine.remove();

  const canvas = el("canvas");
  card.append(canvas);
  card.append(el("p", `verdict ${label}`, label));
  const numbers = el("dl", "numbers");
  const facts = [["Probability", `${(100 * probability).toFixed(1)}% adenocarcinoma`, "probability"],
    ["Threshold", Number(state.params.threshold).toFixed(4), ""],
    ["OOD score", `${outputs.ood_score.data[0].toFixed(3)} (limit ${Number(state.params.ood_threshold).toFixed(3)})`,
      ""]];
  for (const [term, value, cls] of facts) numbers.append(el("dt", "", term), el("dd", cls, value));
  card.append(numbers);
  if (!inside) {
    card.append(el("p", "warning", "The model's out-of-distribution guard found this image unlike the CT slices " +
      "it was trained on: its probability means nothing."));
  }

  let picture = null;
  if (input === "image") {
    try { picture = await createImageBitmap(entry.file); } catch (_) { picture = null; }
  }
  if (!picture) {
    card.append(el("p", "note", input === "dicom"
      ? "A browser cannot display DICOM: the heatmap is drawn alone, on the model's square input."
      : "The browser cannot display this file: the heatmap is drawn alone."));
  }
  let heat = null;
  if (outputs.heatmap) {
    const [, h, w] = outputs.heatmap.shape;
    heat = heatCanvas(outputs.heatmap.data, h, w);
  } else {
    card.append(el("p", "note", "This model returns no heatmap (it has no explain signatures)."));
  }
  const side = 320;
  const aspect = picture ? picture.width / picture.height : 1;
  canvas.width = Math.round(aspect >= 1 ? side : side * aspect);
  canvas.height = Math.round(aspect >= 1 ? side / aspect : side);
  canvas.dataset.heatmap = heat ? "drawn" : "none";
  const draw = () => {
    const ctx = canvas.getContext("2d");
    ctx.globalAlpha = 1;
    ctx.fillStyle = "#111";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    if (picture) ctx.drawImage(picture, 0, 0, canvas.width, canvas.height);
    if (heat) {  // the model's grid stretched over the picture, as the model stretches the picture to a square
      ctx.imageSmoothingEnabled = true;
      ctx.globalAlpha = picture ? state.opacity : 1;
      ctx.drawImage(heat, 0, 0, canvas.width, canvas.height);
    }
  };
  draw();
  entry.draw = draw;
  state.cards.add(entry);
}

/** The heatmap as an h x w canvas: the ramp's colour, opaque where the map is high, clear where it is zero. */
function heatCanvas(values, h, w) {
  const canvas = el("canvas");
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(w, h);
  values.forEach((v, i) => {
    const x = Math.min(1, Math.max(0, v)) * (RAMP.length - 1);
    const lo = Math.floor(x);
    const hi = Math.min(RAMP.length - 1, lo + 1);
    for (let c = 0; c < 3; c++) image.data[4 * i + c] = RAMP[lo][c] + (RAMP[hi][c] - RAMP[lo][c]) * (x - lo);
    image.data[4 * i + 3] = Math.round(255 * Math.min(1, Math.max(0, v)));
  });
  ctx.putImageData(image, 0, 0);
  return canvas;
}

/** Files are sent one at a time, in the order chosen (a page should not flood the server's queue). */
function enqueue(files) {
  for (const file of files) {
    const entry = newCard(file);
    state.queue = state.queue.then(() => classify(entry)).catch((err) => showError(entry, `Unexpected: ${err}`));
  }
}

function setUp() {
  const input = $("files");
  input.addEventListener("change", () => { enqueue([...input.files]); input.value = ""; });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (!input.disabled) enqueue([...e.dataTransfer.files]);
  });
  const opacity = $("opacity");
  opacity.addEventListener("input", () => {
    state.opacity = Number(opacity.value) / 100;
    $("opacity-value").textContent = `${opacity.value}%`;
    for (const entry of state.cards) entry.draw();
  });
  $("clear").addEventListener("click", () => { $("results").replaceChildren(); state.cards.clear(); });
  loadModel();
}

setUp();
