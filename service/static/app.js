// The search page: talks to the service's own /v1 API only (no build step, no third-party code).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const form = $("search-form");
  const textInput = $("text-query");
  const fileInput = $("image-file");
  const dropZone = $("drop-zone");
  const preview = $("preview");
  const kInput = $("k");
  const button = $("search-button");
  const errorBox = $("error");
  const noticeBox = $("notice");
  const results = $("results");
  const heading = $("results-heading");
  const hitsList = $("hits");

  let nBits = null;       // from /v1/index/stats; also taken from each search response
  let chosenFile = null;  // the image of image mode (dropped, pasted or chosen)
  let previewUrl = null;
  let inflight = null;    // AbortController of the running search: a new search cancels it
  const MAX_RANK = 10000;  // offset + k: the deepest rank the API answers
  let last = null;        // the shown search: {send(offset), k, shown, describe}, for "More"
  const moreButton = $("more");

  const mode = () => document.querySelector('input[name="mode"]:checked').value;
  const target = () => document.querySelector('input[name="target"]:checked').value;

  function setTarget(value) {
    $(value === "image" ? "target-image" : "target-text").checked = true;
  }

  function setMode(value) {
    $(value === "image" ? "mode-image" : "mode-text").checked = true;
    $("text-pane").hidden = value !== "text";
    $("image-pane").hidden = value !== "image";
    // Cross-modal is the point: a text query looks for images, an image query for texts.
    setTarget(value === "text" ? "image" : "text");
  }

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
  }

  function showNotice(message) {
    noticeBox.textContent = message;
    noticeBox.hidden = !message;
  }

  function clearMessages() {
    errorBox.hidden = true;
    errorBox.textContent = "";
    showNotice("");
  }

  function setBusy(busy) {
    button.disabled = busy;
    button.classList.toggle("busy", busy);
    results.setAttribute("aria-busy", String(busy));
    results.dataset.state = busy ? "loading" : results.dataset.state;
  }

  // The API's errors: {"detail": str, "errors": [...]}, or FastAPI's 422 {"detail": [...]}.
  async function errorMessage(response) {
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      return `The service answered ${response.status} ${response.statusText} without details.`;
    }
    const detail = body && body.detail;
    let text;
    if (Array.isArray(detail)) {
      text = detail
        .map((d) => `${(d.loc || []).filter((p) => p !== "body").join(".")}: ${d.msg}`)
        .join("; ");
    } else {
      text = String(detail);
    }
    const items = (body && Array.isArray(body.errors) ? body.errors : [])
      .map((e) => e.reason).filter(Boolean);
    if (items.length) text += ` (${items.join("; ")})`;
    return `${describeStatus(response.status)} (${response.status}): ${text}`;
  }

  function describeStatus(status) {
    if (status === 415) return "That file is not an image";
    if (status === 413) return "That is too large for the service";
    if (status === 400 || status === 422) return "The service could not use that query";
    if (status === 503) return "The service is not ready yet";
    if (status === 404) return "Not found";
    return "The search failed";
  }

  function readK() {
    const k = Number.parseInt(kInput.value, 10);
    return Number.isFinite(k) ? k : kInput.value;  // let the API say what is wrong with it
  }

  // search: {send(offset) -> [url, init], describe}; offset 0 starts a new list, more appends.
  async function post(search, offset) {
    if (inflight) inflight.abort();
    const controller = new AbortController();
    inflight = controller;
    clearMessages();
    setBusy(true);
    try {
      const [url, init] = search.send(offset);
      const response = await fetch(url, { ...init, signal: controller.signal });
      if (!response.ok) {
        const message = await errorMessage(response);
        if (offset === 0) render(null);
        showError(message);
        return;
      }
      const body = await response.json();
      if (offset === 0) {
        last = { ...search, shown: 0 };
        render(body, search.describe);
      } else {
        append(body);
      }
    } catch (err) {
      if (err.name === "AbortError") return;
      render(null);
      showError(`Could not reach the service: ${err.message}`);
    } finally {
      if (inflight === controller) {
        inflight = null;
        setBusy(false);
      }
    }
  }

  function searchText(text) {
    const k = readK();
    const into = target();
    return post({
      describe: `“${text}”`,
      send: (offset) => ["/v1/search/text", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ text, k, target: into, offset }),
      }],
    }, 0);
  }

  function searchImage(file) {
    const k = readK();
    const into = target();
    return post({
      describe: file.name ? `${file.name}` : "your image",
      send: (offset) => {
        const data = new FormData();
        data.append("file", file, file.name || "pasted-image");
        data.append("k", String(k));
        data.append("target", into);
        data.append("offset", String(offset));
        return ["/v1/search/image", { method: "POST", body: data }];
      },
    }, 0);
  }

  function runSearch() {
    if (mode() === "text") {
      const text = textInput.value.trim();
      if (!text) {
        clearMessages();
        showError("Type a few words to search with.");
        textInput.focus();
        return;
      }
      searchText(text);
    } else {
      if (!chosenFile) {
        clearMessages();
        showError("Choose or drop an image to search with.");
        fileInput.focus();
        return;
      }
      searchImage(chosenFile);
    }
  }

  function useFile(file) {
    if (!file) return;
    chosenFile = file;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = null;
    if ((file.type || "").startsWith("image/")) {
      previewUrl = URL.createObjectURL(file);
      preview.src = previewUrl;
      preview.alt = `Query image: ${file.name || "pasted image"}`;
      preview.hidden = false;
    } else {
      preview.hidden = true;
      preview.removeAttribute("src");
    }
    const title = $("drop-title");
    title.replaceChildren(el("strong", "", file.name || "pasted image"));
    $("drop-detail").textContent = "Drop another image here, paste one, or choose a file";
    if (mode() !== "image") setMode("image");
    searchImage(file);
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function distanceBadge(distance, bits, score) {
    const badge = el("span", "distance");
    badge.title = `Hamming distance ${distance} of ${bits} bits (smaller is closer); ` +
      `score ${score.toFixed(3)} (what the results are ranked by, higher first)`;
    badge.append(el("span", "distance-value", String(distance)));
    badge.append(el("span", "visually-hidden", ` bits differ of ${bits}`));
    const bar = el("span", "closeness");
    bar.setAttribute("aria-hidden", "true");
    const fill = el("span", "closeness-fill");
    fill.style.width = `${Math.max(2, Math.round(100 * (1 - distance / bits)))}%`;
    bar.append(fill);
    badge.append(bar);
    return badge;
  }

  function thumbnail(hit, className) {
    const img = el("img", className);
    img.src = hit.image_url;
    img.alt = hit.text;
    img.loading = "lazy";
    img.decoding = "async";
    img.addEventListener("error", () => img.classList.add("broken"));
    return img;
  }

  function hitCard(hit, kind, bits, rank) {
    const li = el("li", `hit hit-${kind}`);
    li.dataset.id = String(hit.id);
    li.dataset.distance = String(hit.distance);
    li.dataset.score = String(hit.score);
    const meta = el("div", "hit-meta");
    meta.append(el("span", "rank", `#${rank}`), distanceBadge(hit.distance, bits, hit.score));
    if (kind === "image") {
      li.append(thumbnail(hit, "hit-image"));
      li.append(meta);
      li.append(el("p", "hit-caption muted", hit.text));
      li.append(actionButton("Find texts like this image", () => searchWithItemImage(hit)));
    } else {
      const body = el("div", "hit-body");
      body.append(thumbnail(hit, "hit-thumb"));
      body.append(el("p", "hit-text", hit.text));
      li.append(meta);
      li.append(body);
      li.append(actionButton("Find images for this text", () => searchWithCaption(hit.text)));
    }
    return li;
  }

  function actionButton(label, onClick) {
    const b = el("button", "link-button", label);
    b.type = "button";
    b.addEventListener("click", onClick);
    return b;
  }

  function searchWithCaption(text) {
    setMode("text");
    textInput.value = text;
    searchText(text);
    textInput.focus();
  }

  async function searchWithItemImage(hit) {
    try {
      const response = await fetch(hit.image_url);
      if (!response.ok) {
        showError(await errorMessage(response));
        return;
      }
      const blob = await response.blob();
      const name = `item-${hit.id}.${(blob.type.split("/")[1] || "jpg")}`;
      useFile(new File([blob], name, { type: blob.type }));
      fileInput.focus();
    } catch (err) {
      showError(`Could not load the image of item ${hit.id}: ${err.message}`);
    }
  }

  function render(body, describe) {
    hitsList.replaceChildren();
    moreButton.hidden = true;
    if (!body) {
      heading.textContent = "No results.";
      results.dataset.state = "error";
      last = null;
      return;
    }
    const bits = body.n_bits || nBits || 64;
    const kind = body.target === "image" ? "image" : "text";
    hitsList.className = `hits hits-${kind}`;
    const noun = kind === "image" ? "image" : "text";
    if (body.no_known_words) {
      heading.textContent = `No ${noun}s: the model knows none of the words of ${describe}.`;
      showNotice(`${body.message}.` +
        (examples.length ? ` Try words it knows, such as “${examples.slice(0, 3).join("”, “")}”.` : ""));
      results.dataset.state = "done";
      return;
    }
    append(body);
    if (!body.hits.length) {
      heading.textContent = `No ${noun}s for ${describe}: the ${noun} index is empty.`;
    }
    if (body.unknown_words && body.unknown_words.length) {
      showNotice(`Searched with: ${body.used_words.join(", ")}. ` +
        `Ignored (not in the model’s vocabulary, or too common): ${body.unknown_words.join(", ")}.`);
    }
    results.dataset.state = "done";
  }

  // Adds a page of hits after those shown; "More" stays while a page comes back full.
  function append(body) {
    const bits = body.n_bits || nBits || 64;
    const kind = body.target === "image" ? "image" : "text";
    const start = last ? last.shown : 0;
    body.hits.forEach((hit, i) => hitsList.append(hitCard(hit, kind, bits, start + i + 1)));
    if (last) last.shown = start + body.hits.length;
    const count = start + body.hits.length;
    const noun = kind === "image" ? "image" : "text";
    if (count && last) {
      heading.textContent =
        `${count} ${noun}${count === 1 ? "" : "s"} nearest to ${last.describe} · ${bits}-bit codes`;
    }
    moreButton.hidden = !last || body.hits.length < body.k || last.shown + body.k > MAX_RANK;
    results.dataset.state = "done";
  }

  function showMore() {
    if (last) post(last, last.shown);
  }

  let examples = [];

  function showExamples(list) {
    examples = list;
    const box = $("examples");
    for (const text of list) {
      const chip = el("button", "chip", text);
      chip.type = "button";
      chip.addEventListener("click", () => {
        textInput.value = text;
        setTarget("image");
        searchText(text);
      });
      box.append(chip);
    }
    box.hidden = list.length === 0;
  }

  // The "Try:" row: words of the served model's own vocabulary, frequent in this collection.
  async function loadExamples() {
    try {
      const response = await fetch("/v1/search/words?n=8");
      if (response.ok) showExamples((await response.json()).words);
    } catch (_) {
      // No suggestions: the row stays hidden.
    }
  }

  async function loadStats() {
    const stats = $("stats");
    try {
      const response = await fetch("/v1/index/stats");
      if (!response.ok) {
        stats.textContent = "";
        showError(await errorMessage(response));
        return;
      }
      const s = await response.json();
      nBits = s.n_bits;
      stats.textContent = `${s.items.toLocaleString()} items indexed · ${s.n_bits}-bit codes · ` +
        `trained on “${s.checkpoint_dataset}” · image backbone ${s.image_backbone}`;
      loadExamples();
    } catch (err) {
      stats.textContent = "";
      showError(`Could not reach the service: ${err.message}`);
    }
  }

  // Wiring.
  moreButton.addEventListener("click", showMore);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    runSearch();
  });
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", () => setMode(radio.value));
  }
  fileInput.addEventListener("change", () => {
    if (fileInput.files && fileInput.files[0]) useFile(fileInput.files[0]);
  });
  // A drop anywhere on the page is an image query (and never navigates away from the page).
  let dragDepth = 0;
  window.addEventListener("dragenter", (event) => {
    event.preventDefault();
    dragDepth += 1;
    dropZone.classList.add("dragging");
    if (mode() !== "image") setMode("image");
  });
  window.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) dropZone.classList.remove("dragging");
  });
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => {
    event.preventDefault();
    dragDepth = 0;
    dropZone.classList.remove("dragging");
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) useFile(file);
  });
  window.addEventListener("paste", (event) => {
    const items = event.clipboardData ? [...event.clipboardData.files] : [];
    const image = items.find((f) => (f.type || "").startsWith("image/"));
    if (image) {
      event.preventDefault();
      useFile(image);
    }
  });
  // The file input is visually hidden but focusable (Space opens the chooser): show its focus.
  fileInput.addEventListener("focus", () => dropZone.classList.add("focused"));
  fileInput.addEventListener("blur", () => dropZone.classList.remove("focused"));

  setMode("text");
  loadStats();
})();
