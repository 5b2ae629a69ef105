// qkv's web page: pick a model, send text (or a file) to this server's own API, show the result and
// where each token looked. Every text from the user, the model or the server is written with
// textContent or as an attribute value, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const TASKS = { embeddings: "Embed", chat: "Chat", completions: "Complete", classify: "Classify",
                transcriptions: "Transcribe" };
const state = {
  key: sessionStorage.getItem("qkv-key") || "",  // this tab only; never in localStorage or a cookie
  models: [],
  attn: null,     // {tokens: [{text, raw, prompt}], rows: [pos] -> {layer: entry}, layers: [int]}
  focus: null,    // the token (position) whose attention is shown
  pinned: false,  // a click fixes the focus; hovering then changes nothing
  busy: false,
};

// --- the server's API -----------------------------------------------------------------------------

async function api(path, init = {}) {
  const headers = new Headers(init.headers || {});
  if (state.key) headers.set("Authorization", `Bearer ${state.key}`);
  const r = await fetch(path, { ...init, headers });
  if (!r.ok) throw new Error(await errorText(r));
  return r;
}

async function errorText(r) {
  // the server's errors are OpenAI-shaped: {"error": {"message": ...}}
  try {
    const body = await r.json();
    if (body && body.error && body.error.message) return `${r.status}: ${body.error.message}`;
  } catch (e) { /* not JSON: the status line says enough */ }
  return `${r.status} ${r.statusText}`;
}

function postJSON(path, body) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

async function* events(response) {
  // server-sent events: "data: {json}" blocks separated by a blank line, "data: [DONE]" last
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const obj = JSON.parse(data);
      if (obj.error) throw new Error(obj.error.message || "the stream failed");
      yield obj;
    }
    if (done) return;
  }
}

// --- status, errors, models -----------------------------------------------------------------------

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function option(select, value, label) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label;
  select.append(o);
}

async function loadModels() {
  showError("");
  $("model").replaceChildren();
  try {
    state.models = (await (await api("/v1/models")).json()).data || [];
  } catch (e) {
    state.models = [];
    showError(`Could not list the models: ${e.message}`);
  }
  for (const m of state.models) option($("model"), m.id, `${m.id} (${(m.qkv && m.qkv.type) || "model"})`);
  pickModel();
}

function currentModel() {
  return state.models.find((m) => m.id === $("model").value);
}

function pickModel() {
  const m = currentModel();
  const tasks = ((m && m.qkv && m.qkv.tasks) || []).filter((t) => t in TASKS);
  $("task").replaceChildren();
  for (const t of tasks) option($("task"), t, TASKS[t]);
  $("run").disabled = !tasks.length;
  pickTask();
}

function pickTask() {
  const task = $("task").value;
  $("max-tokens-box").hidden = !(task === "chat" || task === "completions");
  $("layers-box").hidden = !(task === "chat" || task === "completions" || task === "embeddings");
  $("file-box").hidden = !(task === "classify" || task === "transcriptions");
  $("text").hidden = task === "transcriptions";
}

// --- running a request ----------------------------------------------------------------------------

function attentionSpec() {
  const which = $("layers").value;
  if (which === "off") return undefined;
  return { attention: which === "all" ? { topk: 8 } : { layers: [-1], topk: 8 } };
}

async function run(event) {
  event.preventDefault();
  if (state.busy) return;
  const model = $("model").value, task = $("task").value;
  if (!model || !task) return;
  state.busy = true;
  $("run").disabled = true;
  $("status").textContent = "running…";
  showError("");
  clearResult();
  try {
    await RUNNERS[task](model);
    $("status").textContent = "";
  } catch (e) {
    $("status").textContent = "";
    showError(e.message);
  } finally {
    state.busy = false;
    $("run").disabled = false;
  }
}

const RUNNERS = {
  async embeddings(model) {
    const body = { model, input: $("text").value };
    const qkv = attentionSpec();
    if (qkv) body.qkv = qkv;
    const out = await (await postJSON("/v1/embeddings", body)).json();
    const item = out.data[0];
    $("result").hidden = false;
    $("summary").textContent = embeddingSummary(item.embedding);
    const a = item.qkv && item.qkv.attention;
    if (a) showAttention(fromWhole(a));
  },

  async chat(model) {
    const messages = [{ role: "user", content: $("text").value }];
    await generate("/v1/chat/completions", { model, messages }, (c) => (c.delta && c.delta.content) || "");
  },

  async completions(model) {
    await generate("/v1/completions", { model, prompt: $("text").value }, (c) => c.text || "");
  },

  async classify(model) {
    const file = $("file").files[0];
    const body = { model };
    if (file) body[file.type.startsWith("image/") ? "image" : "audio"] = await base64(file);
    else body.input = $("text").value;
    const out = await (await postJSON("/v1/classify", body)).json();
    $("result").hidden = false;
    const item = (out.data || [])[0] || {};
    const top = item.top || [[item.label, item.score]];
    $("reply").textContent = top.map(([label, score]) => `${label}  ${Number(score).toFixed(4)}`).join("\n");
  },

  async transcriptions(model) {
    const file = $("file").files[0];
    if (!file) throw new Error("choose an audio or video file to transcribe");
    const form = new FormData();
    form.append("file", file);
    form.append("model", model);
    const out = await (await api("/v1/audio/transcriptions", { method: "POST", body: form })).json();
    $("result").hidden = false;
    $("reply").textContent = out.text || "";
  },
};

async function generate(path, body, textOf) {
  const n = Number($("max-tokens").value);
  Object.assign(body, { stream: true, max_tokens: n > 0 ? n : 32 });
  const qkv = attentionSpec();
  if (qkv) body.qkv = qkv;
  const response = await postJSON(path, body);
  $("result").hidden = false;
  for await (const chunk of events(response)) {
    const choice = (chunk.choices || []).find((c) => c.index === 0);
    if (!choice) continue;
    $("reply").append(document.createTextNode(textOf(choice)));
    const rows = choice.qkv && choice.qkv.attention && choice.qkv.attention.rows;
    if (rows) addRows(rows);
  }
}

function base64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(new Error(`could not read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

function preview() {
  // the chosen file, shown from a blob: URL (the file never leaves the page until Run)
  const box = $("preview");
  for (const el of box.children) if (el.src) URL.revokeObjectURL(el.src);
  box.replaceChildren();
  const file = $("file").files[0];
  if (!file) return;
  const kind = file.type.startsWith("image/") ? "img" : file.type.startsWith("video/") ? "video" : "audio";
  const el = document.createElement(kind);
  el.className = "preview";
  if (kind !== "img") el.controls = true;
  el.src = URL.createObjectURL(file);
  box.append(el);
}

function embeddingSummary(v) {
  if (!Array.isArray(v)) return "";
  const norm = Math.sqrt(v.reduce((s, x) => s + x * x, 0));
  const first = v.slice(0, 8).map((x) => x.toFixed(4)).join(", ");
  return `dimension ${v.length}   norm ${norm.toFixed(4)}\nfirst values [${first}${v.length > 8 ? ", …" : ""}]`;
}

function clearResult() {
  $("reply").replaceChildren();
  $("summary").replaceChildren();
  $("result").hidden = true;
  $("attention").hidden = true;
  $("tokens").replaceChildren();
  state.attn = null;
  state.focus = null;
  state.pinned = false;
}

// --- attention ------------------------------------------------------------------------------------
// One layout for both sources: rows[pos][layer] = {heads, weights: [head][key]} or
// {heads, topk_values: [head][k], topk_indices: [head][k]} (the keys token pos looked at).

function fromWhole(a) {
  // a whole response's attention ({tokens, texts, layers: [{layer, heads, weights: [head][query][key]}]})
  const prompt = a.prompt_tokens === undefined ? a.tokens.length : a.prompt_tokens;
  const attn = { tokens: [], rows: [], layers: [] };
  a.tokens.forEach((raw, i) => {
    attn.tokens.push({ raw, text: (a.texts || a.tokens)[i], prompt: i < prompt && prompt < a.tokens.length });
    attn.rows.push({});
  });
  for (const l of a.layers || []) {
    attn.layers.push(l.layer);
    attn.rows.forEach((row, i) => {
      row[l.layer] = l.weights ? { heads: l.heads, weights: l.weights.map((h) => h[i]) }
        : { heads: l.heads, topk_values: l.topk_values.map((h) => h[i]), topk_indices: l.topk_indices.map((h) => h[i]) };
    });
  }
  return attn;
}

function addRows(rows) {
  // streamed rows: the prompt's first, then one per generated token as the model reads it
  const first = state.attn === null;
  if (first) state.attn = { tokens: [], rows: [], layers: [] };
  const attn = state.attn;
  for (const r of rows) {
    const row = {};
    for (const l of r.layers || []) {
      if (!attn.layers.includes(l.layer)) attn.layers.push(l.layer);
      row[l.layer] = l;
    }
    attn.tokens[r.position] = { raw: r.token, text: r.text, prompt: r.prompt };  // the server marks the prompt's rows
    attn.rows[r.position] = row;
  }
  if (first) showAttention(attn);
  else renderTokens();
  const last = rows[rows.length - 1];
  if (!state.pinned && last) focusToken(last.position);
}

function showAttention(attn) {
  state.attn = attn;
  $("attention").hidden = !attn.layers.length;
  $("layer").replaceChildren();
  for (const l of attn.layers) option($("layer"), l, `layer ${l}`);
  $("layer").value = String(attn.layers[attn.layers.length - 1]);
  fillHeads();
  renderTokens();
}

function fillHeads() {
  const keep = $("head").value;
  const heads = new Set();
  for (const row of state.attn.rows) {
    const entry = row && row[$("layer").value];
    if (entry) entry.heads.forEach((h) => heads.add(h));
  }
  $("head").replaceChildren();
  option($("head"), "mean", "mean of heads");
  for (const h of [...heads].sort((a, b) => a - b)) option($("head"), h, `head ${h}`);
  if ([...$("head").options].some((o) => o.value === keep)) $("head").value = keep;
}

function renderTokens() {
  const box = $("tokens");
  const { tokens } = state.attn;
  for (let i = box.children.length; i < tokens.length; i++) {
    const span = document.createElement("span");
    span.className = "tok";
    span.dataset.pos = String(i);
    box.append(span);
  }
  tokens.forEach((t, i) => {
    const span = box.children[i];
    if (!t || span.dataset.filled) return;
    span.textContent = visible(t.text);
    span.title = `#${i} ${t.raw}`;
    span.dataset.filled = "1";
    if (t.prompt) span.classList.add("prompt");
  });
}

function visible(text) {
  return String(text).replace(/\n/g, "↵").replace(/\t/g, "→") || "∅";
}

function keyWeights(entry, head, nKeys) {
  // the weights of one row over the keys: one head's, or the mean of the row's heads
  const heads = head === "mean" ? entry.heads.map((_, i) => i) : [entry.heads.indexOf(Number(head))];
  const out = new Array(nKeys).fill(0);
  for (const h of heads.filter((h) => h >= 0)) {
    if (entry.weights) {
      entry.weights[h].forEach((w, k) => { out[k] += w; });
    } else {
      entry.topk_values[h].forEach((w, j) => {
        const k = entry.topk_indices[h][j];
        if (k >= 0 && k < nKeys) out[k] += w;
      });
    }
  }
  return out.map((w) => w / Math.max(heads.length, 1));
}

function focusToken(pos) {
  const attn = state.attn;
  const spans = $("tokens").children;
  const entry = attn && attn.rows[pos] && attn.rows[pos][$("layer").value];
  for (const span of spans) {
    span.classList.remove("focus", "pinned");
    span.style.backgroundColor = "";
    delete span.dataset.weight;
  }
  state.focus = pos;
  if (!entry || !spans[pos]) {
    $("focus-note").textContent = "";
    return;
  }
  spans[pos].classList.add(state.pinned ? "pinned" : "focus");
  const weights = keyWeights(entry, $("head").value, spans.length);
  weights.forEach((w, k) => {
    spans[k].dataset.weight = String(w);
    spans[k].style.backgroundColor = `rgba(230, 110, 0, ${Math.min(1, w).toFixed(3)})`;
  });
  const best = weights.indexOf(Math.max(...weights));
  const name = (t) => JSON.stringify(visible(attn.tokens[t] ? attn.tokens[t].text : ""));
  $("focus-note").textContent = `token #${pos} ${name(pos)} looked most at #${best} ${name(best)} ` +
    `(${weights[best].toFixed(3)})`;
}

function tokenAt(event) {
  const span = event.target.closest(".tok");
  return span ? Number(span.dataset.pos) : null;
}

// --- wiring ---------------------------------------------------------------------------------------

function start() {
  $("key").value = state.key;
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("key").value.trim();
    if (state.key) sessionStorage.setItem("qkv-key", state.key);
    else sessionStorage.removeItem("qkv-key");
    loadModels();
  });
  $("form").addEventListener("submit", run);
  $("model").addEventListener("change", pickModel);
  $("task").addEventListener("change", pickTask);
  $("file").addEventListener("change", preview);
  $("layer").addEventListener("change", () => { fillHeads(); if (state.focus !== null) focusToken(state.focus); });
  $("head").addEventListener("change", () => { if (state.focus !== null) focusToken(state.focus); });
  $("tokens").addEventListener("mouseover", (e) => {
    const pos = tokenAt(e);
    if (pos !== null && !state.pinned && pos !== state.focus) focusToken(pos);
  });
  $("tokens").addEventListener("click", (e) => {
    const pos = tokenAt(e);
    if (pos === null) return;
    state.pinned = !(state.pinned && pos === state.focus);
    focusToken(pos);
  });
  loadModels();
}

start();
