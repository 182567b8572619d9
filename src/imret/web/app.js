/* imret web page: search by photo (with a crop box), browse the index, add and delete images.
 *
 * Vanilla JS, no dependencies, nothing loaded from the network; talks only to the JSON API of
 * docs/http-api.md on the same origin.
 *
 * Stable hooks for tests (every element below has id == data-testid):
 *   header   #store-count (live image count), #store-model, #token-field (hidden unless the
 *            server has auth), #token-input (kept in localStorage "imret.token", sent as
 *            "Authorization: Bearer <token>"), #nav-search, #nav-browse
 *   status   #message (role=status; class "error" | "ok" | "info"; text in #message-text),
 *            #spinner (visible while a request is in flight)
 *   search   #view-search, #dropzone, #file-input (type=file), #choose-btn, #change-btn,
 *            #preview-img, #crop-box (data-bbox="x1,y1,x2,y2" in original image pixels, absent
 *            when there is no box; focused, arrows move it, Shift+arrows resize it, Escape
 *            clears it), #bbox-readout, #crop-add (a centred box, for keyboard users),
 *            #crop-clear, #k-select, #qe-toggle, #localize-toggle (sends localize=true: hits
 *            get the box of the query object),
 *            #text-form (shown when /api/info server.text.available: the store has a caption model),
 *            #text-input (the text query; maxlength = server.text.max_chars), #text-btn (searches
 *            by text: a JSON POST /api/search {text, k, qe}),
 *            #search-btn (disabled, reading "Searching…", while a search runs), #search-status
 *            (visible while a search runs), #query-caption, #took (also names the re-rankers that
 *            ran), #stale-note (visible while the drawn box differs from the one the shown results
 *            were searched with: the results are greyed, #results has data-stale="true"),
 *            #results-empty (the empty / error text: class "error" and "Search failed: ..." after a
 *            failed search, whose old results are cleared),
 *            #results: data-state = idle | loading | done | error, data-seq = number of result
 *            lists rendered so far (wait for it to change), data-query = "upload" | "id:<n>" | "text";
 *            each hit is li[data-testid=result] with data-id, data-name, data-rank (1-based),
 *            data-score, data-inliers and data-box ("x1,y1,x2,y2" in the hit image's pixels)
 *            when the server sent them; its button.tile-btn searches with that indexed image
 *            and holds span[data-testid=hit-box], the box drawn over the thumbnail (positioned
 *            in % of the square tile, as object-fit: cover shows the image), and the caption
 *            span[data-testid=inliers] ("n inliers").
 *   browse   #view-browse, #browse-grid (data-state, data-page, data-total), #page-prev,
 *            #page-next, #page-info ("Page x of y"), #page-input + #page-go (jump),
 *            li[data-testid=browse-item] (data-id, data-name) with button.tile-btn ("find
 *            similar") and button[data-testid=delete-btn] (only when writes are enabled),
 *            #add-wrap (only when writes are enabled), #add-btn, #add-input (type=file multiple).
 *   routes   "/" or "#search": search view; "/browse", "#browse" or "#browse/<page>": listing.
 */
(() => {
  "use strict";

  const PAGE_SIZE = 60;
  const K_CHOICES = [10, 20, 50, 100];
  const THUMB_SIZE = 256;     // grid thumbnails (long side, px)
  const PREVIEW_SIZE = 1024;  // an indexed image shown as the query
  const MIN_BOX_PX = 6;       // a drag shorter than this (screen px) is a click, not a box
  const TOKEN_KEY = "imret.token";

  const $ = (id) => document.getElementById(id);
  const el = {};
  for (const id of [
    "store-count", "store-model", "token-field", "token-input", "nav-search", "nav-browse",
    "message", "message-text", "message-close", "spinner",
    "view-search", "dropzone", "dropzone-empty", "file-input", "choose-btn", "change-btn",
    "preview-wrap", "preview-stage", "preview-img", "crop-box", "bbox-readout", "crop-add", "crop-clear",
    "query-caption", "search-form", "k-select", "qe-toggle", "qe-label", "localize-toggle", "search-btn",
    "took", "results", "results-empty", "search-status", "stale-note", "text-form", "text-input", "text-btn",
    "view-browse", "browse-grid", "browse-empty", "page-prev", "page-next", "page-info",
    "page-jump", "page-input", "add-wrap", "add-btn", "add-input", "server-version",
  ]) el[id] = $(id);

  const state = {
    info: null,
    auth: { writes: false, reads: false },
    writes: false,
    maxUpload: 0,
    query: null,        // {kind: "upload", file, name, url} | {kind: "indexed", id, name, url} | {kind: "text", text, name}
    box: null,          // [x1, y1, x2, y2] in natural (original, EXIF-upright) pixels, or null
    searchCtl: null,    // AbortController of the search in flight
    resultsBox: null,   // the box the shown results were searched with ("x1,y1,x2,y2", "" for the
                        // whole image), null when no results are shown
    resultsSeq: 0,
    browseSeq: 0,
    page: 1,
    total: null,
    view: null,
    busy: 0,
    blobUrls: { results: [], browse: [], preview: [] },
  };

  // --- API -------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function token() {
    try { return localStorage.getItem(TOKEN_KEY) || ""; } catch { return ""; }
  }

  function authHeaders() {
    const t = token();
    return t ? { Authorization: "Bearer " + t } : {};
  }

  async function api(path, { method = "GET", body, signal, json = false } = {}) {
    let res;
    const headers = json ? { ...authHeaders(), "Content-Type": "application/json" } : authHeaders();
    try {
      res = await fetch(path, { method, body, signal, headers });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(0, "network", "Cannot reach the server (" + e.message + ").");
    }
    let data = null;
    if ((res.headers.get("content-type") || "").includes("json")) {
      try { data = await res.json(); } catch { data = null; }
    }
    if (!res.ok) {
      const err = data && data.error;
      const message = (err && err.message) || `${res.status} ${res.statusText || "error"}`;
      throw new ApiError(res.status, (err && err.code) || `http_${res.status}`, message);
    }
    return data;
  }

  async function fetchBlob(url, signal) {
    const res = await fetch(url, { headers: authHeaders(), signal });
    if (!res.ok) throw new ApiError(res.status, `http_${res.status}`, `${url}: ${res.status} ${res.statusText}`);
    return res.blob();
  }

  function withParams(url, params) {
    const u = new URL(url, location.origin);
    for (const [k, v] of Object.entries(params)) u.searchParams.set(k, String(v));
    return u.origin === location.origin ? u.pathname + u.search : u.href;
  }

  function thumbUrl(item, size) {
    return withParams(item.thumbnail || `/api/images/${item.id}/thumbnail`, { size });
  }

  // --- status: messages and the spinner -------------------------------------------------------

  let messageTimer = 0;

  function showMessage(text, kind = "info") {
    clearTimeout(messageTimer);
    // reports fade after a while; errors stay until dismissed or replaced
    if (kind !== "error") messageTimer = setTimeout(clearMessage, 8000);
    el["message-text"].textContent = text;
    el.message.className = "message " + kind;
    el.message.setAttribute("role", kind === "error" ? "alert" : "status");
    el.message.hidden = false;
  }

  function clearMessage() {
    clearTimeout(messageTimer);
    el.message.hidden = true;
    el["message-text"].textContent = "";
  }

  function showError(e) {
    if (e && e.name === "AbortError") return;
    let text = (e && e.message) || String(e);
    if (e instanceof ApiError && (e.status === 401 || e.status === 403)) {
      el["token-field"].hidden = false;
      text += e.status === 401 ? " Enter the API token above." : " Check the API token above.";
      el["token-input"].focus();
    }
    showMessage(text, "error");
  }

  function busy(delta) {
    state.busy = Math.max(0, state.busy + delta);
    el.spinner.hidden = state.busy === 0;
    document.body.setAttribute("aria-busy", state.busy > 0 ? "true" : "false");
  }

  async function withBusy(promise) {
    busy(+1);
    try { return await promise; } finally { busy(-1); }
  }

  // --- thumbnails ----------------------------------------------------------------------
  // Without read auth a plain lazy <img> is enough. With read auth an <img> cannot send the
  // token, so visible thumbnails are fetched with it and shown from blob: URLs.

  const observer = "IntersectionObserver" in window
    ? new IntersectionObserver((entries) => {
      for (const e of entries) {
        if (!e.isIntersecting) continue;
        observer.unobserve(e.target);
        loadBlobInto(e.target, e.target.dataset.src, e.target.dataset.bucket);
      }
    }, { rootMargin: "400px" })
    : null;

  async function loadBlobInto(img, url, bucket) {
    try {
      const u = URL.createObjectURL(await fetchBlob(url));
      state.blobUrls[bucket].push(u);
      img.src = u;
    } catch {
      img.classList.add("broken");
    }
  }

  function setThumb(img, url, bucket) {
    img.decoding = "async";
    if (!state.auth.reads) {
      img.loading = "lazy";
      img.src = url;
    } else if (observer) {
      img.dataset.src = url;
      img.dataset.bucket = bucket;
      observer.observe(img);
    } else {
      loadBlobInto(img, url, bucket);
    }
  }

  function releaseBlobs(bucket) {
    for (const u of state.blobUrls[bucket]) URL.revokeObjectURL(u);
    state.blobUrls[bucket] = [];
  }

  // --- server info ---------------------------------------------------------------------

  function describeModel(store) {
    if (!store) return "";
    const m = store.model;
    let name = "";
    if (typeof m === "string") name = m;
    else if (m && m.spec) name = [m.spec.backbone, m.spec.pool].filter(Boolean).join(" · ");
    else if (m && m.name) name = m.name;
    if (store.dim) name += (name ? " · " : "") + store.dim + "-D";
    return name;
  }

  function setCount(n) {
    if (typeof n === "number") el["store-count"].textContent = n.toLocaleString("en-US");
  }

  async function loadInfo() {
    let info;
    try {
      info = await api("/api/info");
    } catch (e) {
      showError(e);
      try { setCount((await api("/api/health")).images); } catch { /* shown above */ }
      return;
    }
    state.info = info;
    const server = info.server || {};
    const store = info.store || {};
    state.auth = { writes: !!(server.auth && server.auth.writes), reads: !!(server.auth && server.auth.reads) };
    state.writes = !!server.writes;
    state.maxUpload = server.max_upload_bytes || 0;
    if (typeof store.images === "number") setCount(store.images);
    else api("/api/health").then((h) => setCount(h.images), () => {});
    const model = describeModel(store);
    el["store-model"].textContent = model;
    el["store-model"].title = model ? "model: " + model : "";
    el["token-field"].hidden = !(state.auth.writes || state.auth.reads) && !token();
    el["add-wrap"].hidden = !state.writes;
    el["server-version"].textContent = server.version ? "imret " + server.version : "imret";
    fillK(server.default_k || 10, server.max_k || 100);
    const text = server.text || {};
    el["text-form"].hidden = !text.available;
    if (text.max_chars) el["text-input"].maxLength = text.max_chars;
    const qe = server.query_expansion || {};
    const on = !!qe.method && qe.method !== "none";
    el["qe-toggle"].checked = on;
    let how = "";
    if (on) {
      const alpha = qe.method === "alpha" && qe.alpha != null ? ", α=" + qe.alpha : "";
      how = ` (${qe.method}${qe.k ? ", k=" + qe.k : ""}${alpha})`;
    }
    el["qe-label"].textContent = "Query expansion" + how;
    el["qe-label"].title = `The server ${on ? "expands" : "does not expand"} queries by default`;
  }

  let kChosen = false;  // the user picked k: keep it when the server's default arrives
  el["k-select"].addEventListener("change", () => { kChosen = true; });

  function fillK(defaultK, maxK) {
    const sel = el["k-select"];
    const current = kChosen && sel.value ? Number(sel.value) : defaultK;
    const choices = [...new Set([...K_CHOICES, defaultK])].filter((k) => k >= 1 && k <= maxK).sort((a, b) => a - b);
    if (!choices.length) choices.push(Math.min(defaultK, maxK));
    sel.replaceChildren(...choices.map((k) => new Option(String(k), String(k))));
    sel.value = String(choices.includes(current) ? current : choices.includes(defaultK) ? defaultK : choices[0]);
  }

  // --- the query: preview and crop box ---------------------------------------------------------

  function setQueryUpload(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      showMessage(`${file.name} is not an image (${file.type}).`, "error");
      return;
    }
    if (state.maxUpload && file.size > state.maxUpload) {
      showMessage(`${file.name} is ${fmtBytes(file.size)}; the server accepts at most ${fmtBytes(state.maxUpload)}.`,
        "error");
      return;
    }
    clearMessage();
    releaseBlobs("preview");
    const url = URL.createObjectURL(file);
    state.blobUrls.preview.push(url);
    state.query = { kind: "upload", file, name: file.name || "pasted image", url };
    showPreview(url, state.query.name);
    runSearch();
  }

  function setQueryIndexed(item) {
    clearMessage();
    releaseBlobs("preview");
    const url = thumbUrl(item, PREVIEW_SIZE);
    state.query = { kind: "indexed", id: item.id, name: item.name, url, width: item.width, height: item.height };
    if (state.auth.reads) {
      showPreview("", item.name);
      fetchBlob(url).then((b) => {
        if (state.query && state.query.url === url) {
          const u = URL.createObjectURL(b);
          state.blobUrls.preview.push(u);
          el["preview-img"].src = u;
        }
      }, showError);
    } else {
      showPreview(url, item.name);
    }
    if (state.view !== "search") location.hash = "#search";
    window.scrollTo({ top: 0, behavior: "smooth" });
    runSearch();
  }

  // A text query: the drop zone goes back to its empty state (a photo can still be chosen), the
  // caption shows the text, and the results come as for a photo.
  function setQueryText(raw) {
    const text = (raw || "").trim();
    if (!text) { showMessage("Type a few words to search by text.", "error"); el["text-input"].focus(); return; }
    clearMessage();
    releaseBlobs("preview");
    state.query = { kind: "text", text, name: text };
    state.box = null;
    el["preview-img"].removeAttribute("src");
    el["preview-wrap"].hidden = true;
    el["dropzone-empty"].hidden = false;
    el["change-btn"].hidden = true;
    el.dropzone.classList.remove("has-image");
    el["search-btn"].disabled = false;
    updateCaption();
    renderBox();
    runSearch();
  }

  el["text-form"].addEventListener("submit", (e) => { e.preventDefault(); setQueryText(el["text-input"].value); });

  function showPreview(url, name) {
    state.box = null;
    const img = el["preview-img"];
    img.removeAttribute("src");
    if (url) img.src = url;
    img.alt = "Query: " + name;
    img.title = name;
    el["dropzone-empty"].hidden = true;
    el["preview-wrap"].hidden = false;
    el["change-btn"].hidden = false;
    el.dropzone.classList.add("has-image");
    el["search-btn"].disabled = false;
    updateCaption();
    renderBox();
  }

  function updateCaption(extra) {
    const q = state.query;
    if (!q) return;
    const img = el["preview-img"];
    const dims = img.naturalWidth && q.kind !== "text" ? ` · ${img.naturalWidth} × ${img.naturalHeight}` : "";
    const what = q.kind === "indexed" ? `Indexed image #${q.id}: ${q.name}`
      : q.kind === "text" ? `Text: “${q.text}”` : `Your photo: ${q.name}`;
    el["query-caption"].textContent = what + dims + (extra ? " · " + extra : "");
    el["query-caption"].title = q.name;  // the full name, also where the caption is cut
  }

  el["preview-img"].addEventListener("load", () => { updateCaption(); renderBox(); });
  el["preview-img"].addEventListener("error", () => {
    if (el["preview-img"].getAttribute("src")) {
      updateCaption("no preview for this format (the server may still read it)");
    }
  });

  function natural() {
    const img = el["preview-img"];
    return { w: img.naturalWidth, h: img.naturalHeight };
  }

  function clampBox(b) {
    const { w, h } = natural();
    let [x1, y1, x2, y2] = b;
    if (x2 < x1) [x1, x2] = [x2, x1];
    if (y2 < y1) [y1, y2] = [y2, y1];
    return [Math.max(0, x1), Math.max(0, y1), Math.min(w, x2), Math.min(h, y2)];
  }

  function roundedBox() {
    if (!state.box) return null;
    const { w, h } = natural();
    const [x1, y1, x2, y2] = state.box;
    const r = [Math.floor(x1), Math.floor(y1), Math.ceil(x2), Math.ceil(y2)];
    r[0] = Math.min(Math.max(0, r[0]), w - 1);
    r[1] = Math.min(Math.max(0, r[1]), h - 1);
    r[2] = Math.max(Math.min(w, r[2]), r[0] + 1);
    r[3] = Math.max(Math.min(h, r[3]), r[1] + 1);
    return r;
  }

  function renderBox() {
    const box = el["crop-box"];
    const img = el["preview-img"];
    const { w } = natural();
    el["crop-add"].hidden = !!state.box || !w;
    el["crop-clear"].hidden = !state.box;
    if (!state.box || !w || !img.clientWidth) {
      box.hidden = true;
      box.removeAttribute("data-bbox");
      el["bbox-readout"].textContent = state.query && state.query.kind === "text" ? ""
        : (state.query ? "Whole image. " : "") + "Drag on the photo to search a region.";
      if (!state.box) updateStale();  // (a box not drawn yet, before the photo is laid out, changes nothing)
      return;
    }
    const s = img.clientWidth / w;
    const [x1, y1, x2, y2] = state.box;
    Object.assign(box.style, {
      left: `${x1 * s}px`, top: `${y1 * s}px`, width: `${(x2 - x1) * s}px`, height: `${(y2 - y1) * s}px`,
    });
    box.hidden = false;
    const r = roundedBox();
    box.dataset.bbox = r.join(",");
    el["bbox-readout"].textContent = `Region ${r[0]},${r[1]} – ${r[2]},${r[3]} (${r[2] - r[0]} × ${r[3] - r[1]} px)`;
    updateStale();
  }

  // Drawing, moving or clearing the box does not search again by itself: the results shown are
  // greyed with a note until Search (or Enter on the box) searches the new box. A box is often
  // adjusted in several drags and nudges, and each search uploads the whole photo and runs the
  // network on it; searching on every release would keep the server busy with boxes the user
  // is still changing, and would swap the results under the pointer. Going back to the box the
  // results were searched with makes them current again.
  function updateStale() {
    const shown = el.results.dataset.state === "done" && state.resultsBox !== null;
    const current = roundedBox();
    const stale = shown && (current ? current.join(",") : "") !== state.resultsBox;
    el.results.classList.toggle("stale", stale);
    el.results.dataset.stale = stale ? "true" : "false";
    el["stale-note"].hidden = !stale;
    el["search-btn"].classList.toggle("attention", stale);
  }

  // Pointer interaction on the preview: drag on the photo draws a box, drag inside it moves it,
  // drag a corner handle resizes it. Coordinates are kept in natural pixels.
  let drag = null;

  function pointAt(e) {
    const rect = el["preview-img"].getBoundingClientRect();
    const { w, h } = natural();
    const x = ((e.clientX - rect.left) / rect.width) * w;
    const y = ((e.clientY - rect.top) / rect.height) * h;
    return { x: Math.min(Math.max(x, 0), w), y: Math.min(Math.max(y, 0), h), sx: e.clientX, sy: e.clientY };
  }

  el["preview-stage"].addEventListener("pointerdown", (e) => {
    if (e.button !== 0 || !natural().w) return;
    const handle = e.target.dataset && e.target.dataset.handle;
    const p = pointAt(e);
    let mode = "new";
    if (handle) mode = handle;
    else if (e.target === el["crop-box"]) mode = "move";
    drag = { mode, start: p, orig: state.box ? [...state.box] : null, moved: false };
    el["preview-stage"].setPointerCapture(e.pointerId);
    e.preventDefault();
  });

  el["preview-stage"].addEventListener("pointermove", (e) => {
    if (!drag) return;
    const p = pointAt(e);
    if (!drag.moved && Math.hypot(p.sx - drag.start.sx, p.sy - drag.start.sy) < 2) return;
    drag.moved = true;
    const { w, h } = natural();
    const o = drag.orig;
    if (drag.mode === "new") {
      state.box = clampBox([drag.start.x, drag.start.y, p.x, p.y]);
    } else if (drag.mode === "move") {
      const bw = o[2] - o[0], bh = o[3] - o[1];
      const x1 = Math.min(Math.max(o[0] + p.x - drag.start.x, 0), w - bw);
      const y1 = Math.min(Math.max(o[1] + p.y - drag.start.y, 0), h - bh);
      state.box = [x1, y1, x1 + bw, y1 + bh];
    } else {
      // corner handle: the opposite corner stays put
      const fx = drag.mode.includes("w") ? o[2] : o[0];
      const fy = drag.mode.includes("n") ? o[3] : o[1];
      state.box = clampBox([fx, fy, p.x, p.y]);
    }
    renderBox();
  });

  function endDrag(e) {
    if (!drag) return;
    const d = drag;
    drag = null;
    if (el["preview-stage"].hasPointerCapture(e.pointerId)) el["preview-stage"].releasePointerCapture(e.pointerId);
    if (!d.moved) return;
    const s = el["preview-img"].clientWidth / natural().w;
    const b = state.box;
    if (!b || (b[2] - b[0]) * s < MIN_BOX_PX || (b[3] - b[1]) * s < MIN_BOX_PX) state.box = d.orig;
    renderBox();
    if (state.box) el["crop-box"].focus({ preventScroll: true });  // arrow keys adjust it next
  }
  el["preview-stage"].addEventListener("pointerup", endDrag);
  el["preview-stage"].addEventListener("pointercancel", endDrag);

  // keyboard: arrows move the focused box, Shift+arrows resize it, Escape / Delete clear it
  el["crop-box"].addEventListener("keydown", (e) => {
    if (!state.box) return;
    const { w, h } = natural();
    const step = Math.max(1, Math.round(Math.max(w, h) / 100));
    const d = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] }[e.key];
    if (e.key === "Escape" || e.key === "Delete" || e.key === "Backspace") {
      clearBox();
    } else if (d) {
      const [x1, y1, x2, y2] = state.box;
      if (e.shiftKey) {
        state.box = [x1, y1, Math.min(w, Math.max(x1 + 1, x2 + d[0])), Math.min(h, Math.max(y1 + 1, y2 + d[1]))];
      } else {
        const dx = Math.min(Math.max(d[0], -x1), w - x2), dy = Math.min(Math.max(d[1], -y1), h - y2);
        state.box = [x1 + dx, y1 + dy, x2 + dx, y2 + dy];
      }
      renderBox();
    } else if (e.key === "Enter") {
      runSearch();
    } else {
      return;
    }
    e.preventDefault();
  });

  function clearBox() {
    state.box = null;
    renderBox();
    el["search-btn"].focus();
  }
  el["crop-clear"].addEventListener("click", clearBox);

  // without a mouse: a centred box to adjust with the arrow keys
  el["crop-add"].addEventListener("click", () => {
    const { w, h } = natural();
    if (!w) return;
    state.box = [w * 0.2, h * 0.2, w * 0.8, h * 0.8];
    renderBox();
    el["crop-box"].focus({ preventScroll: true });
  });

  if ("ResizeObserver" in window) new ResizeObserver(() => renderBox()).observe(el["preview-img"]);
  else window.addEventListener("resize", renderBox);

  // choosing, dropping and pasting photos
  el["choose-btn"].addEventListener("click", () => el["file-input"].click());
  el["change-btn"].addEventListener("click", () => el["file-input"].click());
  el["file-input"].addEventListener("change", () => {
    const f = el["file-input"].files[0];
    el["file-input"].value = "";
    setQueryUpload(f);
  });

  for (const t of ["dragenter", "dragover"]) {
    el.dropzone.addEventListener(t, (e) => {
      e.preventDefault();
      e.dataTransfer.dropEffect = "copy";
      el.dropzone.classList.add("dragover");
    });
  }
  el.dropzone.addEventListener("dragleave", (e) => {
    if (!el.dropzone.contains(e.relatedTarget)) el.dropzone.classList.remove("dragover");
  });
  el.dropzone.addEventListener("drop", (e) => {
    e.preventDefault();
    el.dropzone.classList.remove("dragover");
    const files = [...(e.dataTransfer.files || [])];
    const f = files.find((x) => !x.type || x.type.startsWith("image/")) || files[0];
    if (f) setQueryUpload(f);
    else showMessage("Drop an image file (a photo from your computer).", "error");
  });
  // a file dropped beside the drop zone must not navigate away from the page
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  document.addEventListener("paste", (e) => {
    if (state.view !== "search" || e.target === el["token-input"] || e.target === el["page-input"]
        || e.target === el["text-input"]) return;
    const f = [...(e.clipboardData ? e.clipboardData.files : [])].find((x) => x.type.startsWith("image/"));
    if (f) { e.preventDefault(); setQueryUpload(f); }
  });

  // --- searching ---------------------------------------------------------------------------

  el["search-form"].addEventListener("submit", (e) => { e.preventDefault(); runSearch(); });

  async function runSearch() {
    const q = state.query;
    if (!q) { showMessage("Choose a photo first.", "error"); return; }
    if (state.searchCtl) state.searchCtl.abort();
    const ctl = new AbortController();
    state.searchCtl = ctl;
    const k = Number(el["k-select"].value) || 10;
    const qe = el["qe-toggle"].checked ? "true" : "false";
    const localize = el["localize-toggle"].checked;
    const bbox = roundedBox();
    el.results.dataset.state = "loading";
    setSearching(true);
    busy(+1);
    try {
      let data;
      if (q.kind === "text") {
        const body = JSON.stringify({ text: q.text, k, qe: qe === "true" });
        data = await api("/api/search", { method: "POST", body, signal: ctl.signal, json: true });
      } else if (q.kind === "indexed" && !bbox) {
        const params = localize ? { k, qe, localize: "true" } : { k, qe };
        data = await api(withParams(`/api/images/${q.id}/similar`, params), { signal: ctl.signal });
      } else {
        // an indexed image with a box is searched as an upload of its preview (the box is in
        // the preview's pixels)
        const file = q.kind === "upload" ? q.file : await fetchBlob(q.url, ctl.signal);
        const form = new FormData();
        form.append("image", file, q.name || "query.jpg");
        if (bbox) form.append("bbox", bbox.join(","));
        form.append("k", String(k));
        form.append("qe", qe);
        if (localize) form.append("localize", "true");
        data = await api("/api/search", { method: "POST", body: form, signal: ctl.signal });
      }
      if (ctl !== state.searchCtl) return;
      renderResults(data, q, bbox);
      clearMessage();
    } catch (e) {
      if (e.name === "AbortError" || ctl !== state.searchCtl) return;
      el.results.dataset.state = "error";
      clearResults(`Search failed: ${(e && e.message) || e}`);
      showError(e);
    } finally {
      busy(-1);
      if (ctl === state.searchCtl) {
        state.searchCtl = null;
        setSearching(false);
      }
    }
  }

  // The "searching…" state: the button is disabled and says so, a status with a spinner shows
  // beside the heading, and the results on screen are dimmed until the new ones arrive.
  function setSearching(on) {
    el["search-btn"].disabled = on;
    el["search-btn"].textContent = on ? "Searching…" : "Search";
    el["search-status"].hidden = !on;
    el.results.classList.toggle("loading", on);
    if (on) el.results.setAttribute("aria-busy", "true");
    else el.results.removeAttribute("aria-busy");
    updateStale();
  }

  // A failed search leaves no results of an earlier query on screen, only the reason.
  function clearResults(why) {
    releaseBlobs("results");
    el.results.replaceChildren();
    state.resultsBox = null;
    el.took.textContent = "";
    el["results-empty"].textContent = why;
    el["results-empty"].classList.add("error");
    el["results-empty"].hidden = false;
    updateStale();
  }

  function renderResults(data, q, bbox) {
    releaseBlobs("results");
    const hits = (data && data.results) || [];
    const items = hits.map((hit, i) => {
      const li = document.createElement("li");
      li.className = "tile";
      li.setAttribute("data-testid", "result");
      li.dataset.id = hit.id;
      li.dataset.name = hit.name;
      li.dataset.rank = i + 1;
      li.dataset.score = hit.score;
      if (Array.isArray(hit.box)) li.dataset.box = hit.box.join(",");
      const btn = document.createElement("button");
      btn.type = "button";
      btn.className = "tile-btn";
      btn.title = `Search with ${hit.name}`;
      btn.setAttribute("aria-label",
        `Rank ${i + 1}: ${hit.name}, score ${fmtScore(hit.score)}. Search with this image.`);
      const img = document.createElement("img");
      img.alt = hit.name;
      setThumb(img, thumbUrl(hit, THUMB_SIZE), "results");
      const rank = document.createElement("span");
      rank.className = "rank";
      rank.textContent = i + 1;
      btn.append(img);
      const layer = hitBoxLayer(hit);
      if (layer) btn.append(layer);
      btn.append(rank);
      btn.addEventListener("click", () => setQueryIndexed(hit));
      const size = hit.width && hit.height ? `${hit.width}×${hit.height}` : `#${hit.id}`;
      let second = span("", size);
      if (Number.isInteger(hit.inliers)) {
        li.dataset.inliers = hit.inliers;
        second = span("inliers", `${hit.inliers} inlier${hit.inliers === 1 ? "" : "s"}`, "inliers");
        second.title = `${size}: ${hit.inliers} matched local features agree with one transform`;
      }
      li.append(btn, tileBody(hit.name, [span("score", fmtScore(hit.score), "score"), second]));
      return li;
    });
    el.results.replaceChildren(...items);
    el.results.dataset.query = q.kind === "indexed" ? `id:${q.id}` : q.kind === "text" ? "text" : "upload";
    el.results.dataset.state = "done";
    el.results.dataset.seq = String(++state.resultsSeq);
    state.resultsBox = bbox ? bbox.join(",") : "";
    updateStale();
    el["results-empty"].classList.remove("error");
    el["results-empty"].hidden = hits.length > 0;
    if (!hits.length) el["results-empty"].textContent = "No results: the index is empty.";
    const ms = data.took_ms;
    const took = typeof ms === "number" ? ` · took ${ms.toFixed(ms < 10 ? 1 : 0)} ms` : "";
    const ran = Array.isArray(data.rerank) ? data.rerank : [];
    const stages = ran.length ? ` · re-ranked by ${ran.join(" + ")}` : "";
    el.took.textContent = `${hits.length} result${hits.length === 1 ? "" : "s"}${took}${stages}`;
    const qb = data.query && data.query.bbox;
    if (q.kind === "text") updateCaption("searched by text");
    else updateCaption(bbox ? `searched region ${(qb || bbox).map((v) => Math.round(v)).join(",")}`
      : "searched the whole image");
  }

  // The box a re-ranker localised in a hit (hit.box, in the hit image's pixels) drawn over its
  // thumbnail. The square tile shows the image with object-fit: cover (scaled by its short side,
  // centred), so the box's place in % of the tile follows from the image's size alone and holds
  // at any tile size; the part the tile crops away is cut off. Styles are set through the CSSOM
  // (el.style), which the page's CSP (style-src 'self') allows, as for the crop box.
  function hitBoxLayer(hit) {
    const b = hit.box;
    const w = hit.width, h = hit.height;
    if (!Array.isArray(b) || b.length !== 4 || !b.every(Number.isFinite) || !(w > 0 && h > 0)) return null;
    const m = Math.min(w, h);
    const ox = (1 - w / m) / 2, oy = (1 - h / m) / 2;
    const pct = (v) => Math.min(100, Math.max(0, v * 100));
    const left = pct(ox + b[0] / m), right = pct(ox + b[2] / m);
    const top = pct(oy + b[1] / m), bottom = pct(oy + b[3] / m);
    if (right - left <= 0 || bottom - top <= 0) return null;
    const layer = document.createElement("span");
    layer.className = "hit-box-layer";
    layer.setAttribute("aria-hidden", "true");
    const box = document.createElement("span");
    box.className = "hit-box";
    box.setAttribute("data-testid", "hit-box");
    Object.assign(box.style, {
      left: `${left}%`, top: `${top}%`, width: `${right - left}%`, height: `${bottom - top}%`,
    });
    layer.append(box);
    return layer;
  }

  function tileBody(name, subs) {
    const body = document.createElement("div");
    body.className = "tile-body";
    const n = document.createElement("span");
    n.className = "tile-name";
    n.textContent = name;
    n.title = name;
    const sub = document.createElement("span");
    sub.className = "tile-sub";
    sub.append(...subs);
    body.append(n, sub);
    return body;
  }

  function span(cls, text, testid) {
    const s = document.createElement("span");
    if (cls) s.className = cls;
    if (testid) s.setAttribute("data-testid", testid);
    s.textContent = text;
    return s;
  }

  // --- browsing ------------------------------------------------------------------------------

  function pages() {
    return Math.max(1, Math.ceil((state.total || 0) / PAGE_SIZE));
  }

  function goPage(n) {
    const p = Math.min(Math.max(1, Math.floor(n) || 1), pages());
    const h = `#browse/${p}`;
    if (location.hash === h) loadPage(p); else location.hash = h;
  }

  async function loadPage(page) {
    const seq = ++state.browseSeq;
    page = Math.max(1, Math.floor(page) || 1);
    const grid = el["browse-grid"];
    grid.dataset.state = "loading";
    try {
      const data = await withBusy(api(withParams("/api/images", { offset: (page - 1) * PAGE_SIZE, limit: PAGE_SIZE })));
      if (seq !== state.browseSeq) return;
      state.total = data.total;
      setCount(data.total);
      if (!data.items.length && data.total > 0 && page > pages()) { goPage(pages()); return; }
      state.page = page;
      renderBrowse(data.items);
    } catch (e) {
      if (seq !== state.browseSeq) return;
      grid.dataset.state = "error";
      showError(e);
    }
  }

  function renderBrowse(items) {
    releaseBlobs("browse");
    const grid = el["browse-grid"];
    grid.replaceChildren(...items.map(browseTile));
    const n = pages();
    el["page-info"].textContent = `Page ${state.page} of ${n}`;
    el["page-prev"].disabled = state.page <= 1;
    el["page-next"].disabled = state.page >= n;
    el["page-input"].max = String(n);
    el["page-input"].placeholder = `1–${n}`;
    el["browse-empty"].hidden = state.total > 0;
    grid.dataset.page = String(state.page);
    grid.dataset.total = String(state.total);
    grid.dataset.state = "done";
  }

  function browseTile(item) {
    const li = document.createElement("li");
    li.className = "tile";
    li.setAttribute("data-testid", "browse-item");
    li.dataset.id = item.id;
    li.dataset.name = item.name;
    const btn = document.createElement("button");
    btn.type = "button";
    btn.className = "tile-btn";
    btn.title = `Find images similar to ${item.name}`;
    btn.setAttribute("aria-label", `Find images similar to ${item.name}`);
    const img = document.createElement("img");
    img.alt = item.name;
    setThumb(img, thumbUrl(item, THUMB_SIZE), "browse");
    btn.append(img);
    btn.addEventListener("click", () => setQueryIndexed(item));
    const subs = [span("", `#${item.id}`)];
    if (item.width && item.height) subs.push(span("", `${item.width}×${item.height}`));
    li.append(btn, tileBody(item.name, subs));
    if (state.writes) {
      const actions = document.createElement("div");
      actions.className = "tile-actions";
      const del = document.createElement("button");
      del.type = "button";
      del.className = "btn small danger";
      del.setAttribute("data-testid", "delete-btn");
      del.textContent = "Delete";
      del.setAttribute("aria-label", `Delete ${item.name} from the index`);
      del.addEventListener("click", () => deleteImage(item, del));
      actions.append(del);
      li.append(actions);
    }
    return li;
  }

  async function deleteImage(item, button) {
    if (!window.confirm(`Remove ${item.name} (#${item.id}) from the index?\nThe file itself is not deleted.`)) return;
    button.disabled = true;
    try {
      await withBusy(api(`/api/images/${item.id}`, { method: "DELETE" }));
      showMessage(`Removed ${item.name} (#${item.id}) from the index.`, "ok");
      await loadPage(state.page);
    } catch (e) {
      button.disabled = false;
      showError(e);
    }
  }

  el["page-prev"].addEventListener("click", () => goPage(state.page - 1));
  el["page-next"].addEventListener("click", () => goPage(state.page + 1));
  el["page-jump"].addEventListener("submit", (e) => {
    e.preventDefault();
    const n = Number(el["page-input"].value);
    if (!Number.isFinite(n) || n < 1) { showMessage(`Enter a page number from 1 to ${pages()}.`, "error"); return; }
    goPage(n);
  });

  // adding images
  el["add-btn"].addEventListener("click", () => el["add-input"].click());
  el["add-input"].addEventListener("change", async () => {
    const files = [...el["add-input"].files];
    el["add-input"].value = "";
    if (!files.length) return;
    const tooBig = state.maxUpload ? files.filter((f) => f.size > state.maxUpload) : [];
    if (tooBig.length) {
      const names = tooBig.map((f) => f.name).join(", ");
      showMessage(`Over the server's ${fmtBytes(state.maxUpload)} limit: ${names}. Nothing was added.`, "error");
      return;
    }
    const form = new FormData();
    for (const f of files) form.append("images", f, f.name);
    el["add-btn"].disabled = true;
    showMessage(`Adding ${files.length} image${files.length === 1 ? "" : "s"}…`, "info");
    try {
      const r = await withBusy(api("/api/images", { method: "POST", body: form }));
      showMessage(describeAdd(r), "ok");
      await loadPage(state.page);
    } catch (e) {
      showError(e);
    } finally {
      el["add-btn"].disabled = false;
    }
  });

  function describeAdd(r) {
    const added = r.added || [], dup = r.duplicates || [], skipped = r.skipped || [];
    const lines = [`Added ${added.length} image${added.length === 1 ? "" : "s"}` +
      (added.length ? ` (${added.map((a) => `${a.name} → #${a.id}`).join(", ")})` : "") + "."];
    if (dup.length) lines.push(`Already indexed: ${dup.map((d) => `${d.name} (#${d.id})`).join(", ")}.`);
    if (skipped.length) lines.push(`Skipped: ${skipped.map((s) => `${s.name} (${s.reason})`).join(", ")}.`);
    return lines.join("\n");
  }

  // --- token -----------------------------------------------------------------------------

  el["token-input"].value = token();
  el["token-input"].addEventListener("change", () => {
    const t = el["token-input"].value.trim();
    try {
      if (t) localStorage.setItem(TOKEN_KEY, t); else localStorage.removeItem(TOKEN_KEY);
    } catch { /* private mode: the token lasts for this page only */ }
    clearMessage();
    loadInfo().finally(() => { if (state.view === "browse") loadPage(state.page); });
  });

  el["message-close"].addEventListener("click", clearMessage);

  // --- routing ------------------------------------------------------------------------------

  function route({ load = true } = {}) {
    const h = location.hash;
    const m = /^#browse(?:\/(\d+))?$/.exec(h);
    const browse = m !== null || (!h && /\/browse\/?$/.test(location.pathname));
    state.view = browse ? "browse" : "search";
    el["view-search"].hidden = browse;
    el["view-browse"].hidden = !browse;
    el["nav-search"].classList.toggle("active", !browse);
    el["nav-browse"].classList.toggle("active", browse);
    el["nav-search"].setAttribute("aria-current", browse ? "false" : "page");
    el["nav-browse"].setAttribute("aria-current", browse ? "page" : "false");
    document.title = browse ? "imret · browse" : "imret · image search";
    if (browse && load) loadPage(m && m[1] ? Number(m[1]) : state.page || 1);
  }
  window.addEventListener("hashchange", () => route());

  // --- helpers ------------------------------------------------------------------------------

  function fmtScore(s) {
    return typeof s === "number" ? s.toFixed(3) : String(s);
  }

  function fmtBytes(n) {
    if (n >= 1 << 20) return (n / (1 << 20)).toFixed(n >= 10 << 20 ? 0 : 1) + " MB";
    if (n >= 1 << 10) return Math.round(n / (1 << 10)) + " kB";
    return n + " bytes";
  }

  fillK(K_CHOICES[0], K_CHOICES[K_CHOICES.length - 1]);  // until /api/info says otherwise
  el.results.dataset.state = "idle";
  el.results.dataset.seq = "0";
  route({ load: false });          // show the right view at once
  loadInfo().finally(() => route()); // then list (knowing whether delete buttons are wanted)
})();
