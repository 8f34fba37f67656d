// Demo page: search the index with an uploaded image and show the nearest items.
// Talks only to this server's /v1 API; no external scripts or fonts.
"use strict";

const keyInput = document.getElementById("key-input");
const statusLine = document.getElementById("status");
const resultsList = document.getElementById("results");
const thumbnailUrls = [];

keyInput.value = sessionStorage.getItem("dcl-api-key") || "";
keyInput.addEventListener("change", () => {
  sessionStorage.setItem("dcl-api-key", keyInput.value);
  loadServiceInfo();
});

function authHeaders() {
  const key = keyInput.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function showStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

async function fetchJson(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { ...authHeaders(), ...(options.headers || {}) },
  });
  const body = await response.json();
  if (!response.ok) {
    const message = body.error ? body.error.message : response.statusText;
    throw new Error(`${response.status}: ${message}`);
  }
  return body;
}

async function loadServiceInfo() {
  try {
    const model = await fetchJson("/v1/model");
    const bundle = model.bundle;
    document.getElementById("model-info").textContent =
      `Model ${bundle.architecture}, ${bundle.embedding_dim}-dimensional embeddings, ` +
      `sha256 ${bundle.onnx_sha256.slice(0, 12)}, provider ${model.provider}`;
    const index = await fetchJson("/v1/index");
    document.getElementById("index-info").textContent =
      `Index: ${index.size} items (${index.kind})`;
  } catch (error) {
    document.getElementById("model-info").textContent =
      `Model details unavailable (${error.message})`;
  }
}

async function thumbnailElement(itemId) {
  const response = await fetch(
    `/v1/items/${encodeURIComponent(itemId)}/thumbnail`,
    { headers: authHeaders() },
  );
  if (!response.ok) {
    const placeholder = document.createElement("span");
    placeholder.className = "no-thumbnail";
    placeholder.textContent = "no thumbnail";
    return placeholder;
  }
  const url = URL.createObjectURL(await response.blob());
  thumbnailUrls.push(url);
  const image = document.createElement("img");
  image.src = url;
  image.alt = `thumbnail of ${itemId}`;
  return image;
}

async function renderResults(results) {
  thumbnailUrls.splice(0).forEach((url) => URL.revokeObjectURL(url));
  const items = await Promise.all(
    results.map(async (hit) => {
      const item = document.createElement("li");
      item.className = "result";
      item.appendChild(await thumbnailElement(hit.id));
      const id = document.createElement("div");
      id.className = "item-id";
      id.textContent = hit.id;
      const score = document.createElement("div");
      score.className = "score";
      score.textContent = `score ${hit.score.toFixed(3)}`;
      const metadata = document.createElement("div");
      metadata.className = "metadata";
      metadata.textContent = JSON.stringify(hit.metadata);
      item.append(id, score, metadata);
      return item;
    }),
  );
  resultsList.replaceChildren(...items);
}

async function search(file) {
  const preview = document.getElementById("query-image");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  document.getElementById("query-preview").hidden = false;

  const form = new FormData();
  form.append("image", file);
  form.append("k", document.getElementById("k-input").value || "8");
  showStatus(`Searching for ${file.name}…`);
  const started = performance.now();
  try {
    const body = await fetchJson("/v1/search", { method: "POST", body: form });
    await renderResults(body.results);
    const elapsed = Math.round(performance.now() - started);
    showStatus(`${body.results.length} results in ${elapsed} ms`);
  } catch (error) {
    resultsList.replaceChildren();
    showStatus(`Search failed: ${error.message}`, true);
  }
}

const dropZone = document.getElementById("drop-zone");
document.getElementById("file-input").addEventListener("change", (event) => {
  if (event.target.files.length) search(event.target.files[0]);
});
dropZone.addEventListener("dragover", (event) => {
  event.preventDefault();
  dropZone.classList.add("dragging");
});
dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dragging"));
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  dropZone.classList.remove("dragging");
  if (event.dataTransfer.files.length) search(event.dataTransfer.files[0]);
});

loadServiceInfo();
