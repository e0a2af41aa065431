// The lookalike search page: talks to the JSON API (POST /search, GET /image/{id}, GET /health); no build step.
"use strict";

// query: {file} or {galleryId}; latest: the newest search's number
const state = { query: null, queryLabel: null, latest: 0 };
// Re-rankers whose "distance" is a negated similarity score (ICFRR): their columns show the score, higher = closer.
const SCORE_RERANKERS = new Set(["icfrr"]);
const $ = (id) => document.getElementById(id);

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function loadHealth() {
  const response = await fetch("/health");
  const health = await response.json();
  $("gallery-info").textContent = `${health.gallery_size} gallery images · ${health.model} · ${health.index} (${health.metric})`;
  $("k").max = health.max_k;
  $("filter-box").hidden = health.backend !== "milvus";  // filters are Milvus expressions
  const box = $("rerankers");
  if (health.rerankers.length) box.querySelector(".none").remove();
  for (const name of health.rerankers) {
    const label = document.createElement("label");
    const input = Object.assign(document.createElement("input"), { type: "checkbox", value: name, className: "reranker" });
    input.addEventListener("change", () => state.query && search());
    label.append(input, " " + name);
    box.append(label);
  }
}

function chosenRerankers() {
  return [...document.querySelectorAll("input.reranker:checked")].map((input) => input.value);
}

// Three significant digits; |value| < 1e-6 is float noise around zero (an image against itself) and shows as 0.
function formatNumber(value) {
  return Math.abs(value) < 1e-6 ? "0" : String(Number(value.toPrecision(3)));
}

// Whether a column's values are scores (higher = more similar) rather than distances: from its re-ranker's name.
function isScoreColumn(name) {
  return SCORE_RERANKERS.has(name.split("(")[0]);
}

function valueText(distance, score) {
  return score ? `score = ${formatNumber(-distance)}` : `d = ${formatNumber(distance)}`;
}

function rankChange(change) {
  const span = document.createElement("span");
  span.className = "change";
  if (change === null) { span.classList.add("new"); span.textContent = "new"; }
  else if (change > 0) { span.classList.add("up"); span.textContent = `▲${change}`; }
  else if (change < 0) { span.classList.add("down"); span.textContent = `▼${-change}`; }
  else { span.classList.add("same"); span.textContent = "="; }
  return span;
}

function resultCard(item, rank, showChange, score) {
  const card = document.createElement("div");
  card.className = "result";
  card.dataset.id = item.id;
  card.dataset.externalId = item.external_id;
  if (state.queryLabel !== null && item.label === state.queryLabel) card.classList.add("same-label");
  const name = item.label ?? item.external_id;  // a gallery without labels: its external id
  const details = [item.external_id, ...Object.entries(item.metadata).map(([key, value]) => `${key}: ${value}`)];
  const img = Object.assign(document.createElement("img"), {
    src: `/image/${item.id}`, alt: name, title: details.join("\n"), loading: "lazy",
  });
  const meta = document.createElement("div");
  meta.className = "meta";
  const label = Object.assign(document.createElement("span"), { className: "label", textContent: name, title: name });
  const value = Object.assign(document.createElement("span"), {
    className: score ? "value score" : "value distance",
    textContent: valueText(item.distance, score),
    title: score ? "ICFRR score: higher is more similar (the API's distance is its negative)" : "distance: lower is more similar",
  });
  meta.append(label, value);
  if (showChange) meta.append(rankChange(item.rank_change));
  const number = Object.assign(document.createElement("span"), { className: "rank", textContent: rank + 1 });
  card.append(number, img, meta);
  card.addEventListener("click", () => {
    state.query = { galleryId: item.id };
    search();
  });
  return card;
}

function columnTitle(name, score) {
  const title = Object.assign(document.createElement("h2"), { textContent: name });
  const kind = Object.assign(document.createElement("span"), {
    className: "kind", textContent: score ? "score, higher = closer" : "distance, lower = closer",
  });
  title.append(kind);
  return title;
}

// The query drawn on a canvas, letterboxed: an upload needs no blob: or data: URL (a strict img-src 'self' allows this).
async function showPreview(query, number) {
  const source = query.file || await (await fetch(`/image/${query.galleryId}`)).blob();
  const bitmap = await createImageBitmap(source);
  if (number !== state.latest) return;
  const canvas = $("query-image");
  const context = canvas.getContext("2d");
  const scale = Math.min(canvas.width / bitmap.width, canvas.height / bitmap.height);
  const width = bitmap.width * scale, height = bitmap.height * scale;
  context.fillStyle = "#fff";
  context.fillRect(0, 0, canvas.width, canvas.height);
  context.drawImage(bitmap, (canvas.width - width) / 2, (canvas.height - height) / 2, width, height);
  bitmap.close();
  canvas.hidden = false;
}

function render(response, query) {
  state.queryLabel = response.query_label;
  const columns = $("columns");
  columns.replaceChildren();
  for (const ranking of response.columns) {
    const score = isScoreColumn(ranking.name);
    const column = document.createElement("section");
    column.className = "column";
    column.dataset.column = ranking.name;
    column.append(columnTitle(ranking.name, score),
      ...ranking.items.map((item, rank) => resultCard(item, rank, ranking.name !== "original", score)));
    columns.append(column);
  }
  $("query").hidden = false;
  $("query-image").hidden = true;  // until the new preview is drawn
  showPreview(query, state.latest).catch(() => {});  // the browser cannot draw it: the label says what the query was
  const described = response.query_label === null ? response.query_external_id : `label ${response.query_label}`;
  $("query-label").textContent = response.query_gallery_id === null ? "uploaded image" : `gallery #${response.query_gallery_id} · ${described}`;
}

// A failed search leaves nothing of the previous one: no results, no preview, only the error.
function clearResults(message) {
  state.query = null;
  state.queryLabel = null;
  $("columns").replaceChildren();
  $("query").hidden = true;
  showError(message);
}

function setBusy(busy) {
  document.body.classList.toggle("busy", busy);
  $("columns").setAttribute("aria-busy", String(busy));
  $("status").hidden = !busy;
}

async function search() {
  const query = state.query;
  const number = ++state.latest;  // a slower, older search must not overwrite a newer one
  const form = new FormData();
  if (query.file) form.append("file", query.file);
  else form.append("gallery_id", query.galleryId);
  form.append("k", $("k").value);
  for (const name of chosenRerankers()) form.append("rerankers", name);
  if (!$("filter-box").hidden && $("filter").value.trim()) form.append("filter", $("filter").value.trim());
  setBusy(true);
  try {
    const response = await fetch("/search", { method: "POST", body: form });
    const body = await response.json();
    if (number !== state.latest) return;
    if (!response.ok) {
      clearResults(typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
      return;
    }
    showError("");
    render(body, query);
  } catch (error) {
    if (number === state.latest) clearResults(`search failed: ${error}`);
  } finally {
    if (number === state.latest) setBusy(false);
  }
}

function searchFile(file) {
  if (!file) return;
  state.query = { file };
  state.queryLabel = null;
  search();
}

// The first file of a drop or a paste (a screenshot, a copied image), if any.
function firstFile(transfer) {
  if (!transfer) return null;
  if (transfer.files && transfer.files.length) return transfer.files[0];
  const item = [...(transfer.items || [])].find((entry) => entry.kind === "file");
  return item ? item.getAsFile() : null;
}

function listenForFiles() {
  const drop = $("drop");
  $("upload").addEventListener("change", (event) => {
    searchFile(event.target.files[0]);
    event.target.value = "";  // choosing the same file again searches again
  });
  for (const type of ["dragenter", "dragover"]) {
    document.addEventListener(type, (event) => { event.preventDefault(); drop.classList.add("dragging"); });
  }
  document.addEventListener("dragleave", (event) => {
    if (event.relatedTarget === null) drop.classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("dragging");
    searchFile(firstFile(event.dataTransfer));
  });
  document.addEventListener("paste", (event) => {
    const file = firstFile(event.clipboardData);
    if (!file) return;
    event.preventDefault();
    searchFile(file);
  });
}

window.addEventListener("DOMContentLoaded", () => {
  loadHealth().catch((error) => showError(`cannot reach the server: ${error}`));
  listenForFiles();
  $("k").addEventListener("change", () => state.query && search());
  $("filter").addEventListener("change", () => state.query && search());
});
