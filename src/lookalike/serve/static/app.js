// The lookalike search page: talks to the JSON API (POST /search, GET /image/{id}, GET /health); no build step.
"use strict";

const state = { query: null, queryLabel: null };  // query: {file} or {galleryId}
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

function rankChange(change) {
  const span = document.createElement("span");
  span.className = "change";
  if (change === null) { span.classList.add("new"); span.textContent = "new"; }
  else if (change > 0) { span.classList.add("up"); span.textContent = `▲${change}`; }
  else if (change < 0) { span.classList.add("down"); span.textContent = `▼${-change}`; }
  else { span.classList.add("same"); span.textContent = "="; }
  return span;
}

function resultCard(item, rank, showChange) {
  const card = document.createElement("div");
  card.className = "result";
  card.dataset.id = item.id;
  if (state.queryLabel !== null && item.label === state.queryLabel) card.classList.add("same-label");
  const img = Object.assign(document.createElement("img"), { src: `/image/${item.id}`, alt: item.label, loading: "lazy" });
  const meta = document.createElement("div");
  meta.className = "meta";
  const label = Object.assign(document.createElement("span"), { className: "label", textContent: item.label, title: item.label });
  const distance = Object.assign(document.createElement("span"), { className: "distance", textContent: `d = ${item.distance.toPrecision(3)}` });
  meta.append(label, distance);
  if (showChange) meta.append(rankChange(item.rank_change));
  const number = Object.assign(document.createElement("span"), { className: "rank", textContent: rank + 1 });
  card.append(number, img, meta);
  card.addEventListener("click", () => {
    state.query = { galleryId: item.id };
    search();
  });
  return card;
}

function render(response) {
  state.queryLabel = response.query_label;
  const columns = $("columns");
  columns.replaceChildren();
  for (const ranking of response.columns) {
    const column = document.createElement("section");
    column.className = "column";
    column.dataset.column = ranking.name;
    const title = Object.assign(document.createElement("h2"), { textContent: ranking.name });
    column.append(title, ...ranking.items.map((item, rank) => resultCard(item, rank, ranking.name !== "original")));
    columns.append(column);
  }
  $("query").hidden = false;
  $("query-label").textContent = response.query_label === null ? "uploaded image" : `gallery #${response.query_gallery_id} · label ${response.query_label}`;
  if (response.query_gallery_id !== null) $("query-image").src = `/image/${response.query_gallery_id}`;
}

async function search() {
  const form = new FormData();
  if (state.query.file) form.append("file", state.query.file);
  else form.append("gallery_id", state.query.galleryId);
  form.append("k", $("k").value);
  for (const name of chosenRerankers()) form.append("rerankers", name);
  document.body.classList.add("busy");
  try {
    const response = await fetch("/search", { method: "POST", body: form });
    const body = await response.json();
    if (!response.ok) {
      showError(typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
      return;
    }
    showError("");
    render(body);
  } catch (error) {
    showError(`search failed: ${error}`);
  } finally {
    document.body.classList.remove("busy");
  }
}

window.addEventListener("DOMContentLoaded", () => {
  loadHealth().catch((error) => showError(`cannot reach the server: ${error}`));
  $("upload").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (!file) return;
    state.query = { file };
    state.queryLabel = null;
    $("query-image").src = URL.createObjectURL(file);
    search();
  });
  $("k").addEventListener("change", () => state.query && search());
});
