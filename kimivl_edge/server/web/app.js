// The chat page: conversations (store.js), the composer with its images, streaming turns (api.js), and the
// rendering of messages (markdown.js, grounding.js). State flows one way: an action changes `state.conv`, saves
// it, and redraws what changed.

import { ApiError, serverInfo, setApiKey, streamChat } from "./api.js";
import { groundingMarks, marksFromActions } from "./grounding.js";
import { renderMarkdown } from "./markdown.js";
import * as store from "./store.js";

const $ = (id) => document.getElementById(id);
const DEFAULT_MAX_TOKENS = 512;
const LAST_OPEN = "kimivl-edge.open";

const state = {
  info: null,        // /props + the model id
  convs: [],         // every conversation, newest first
  conv: null,        // the open one
  pending: [],       // images attached to the composer: {url, name, width, height}
  controller: null,  // the running turn's AbortController
};

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function button(label, cls, onClick) {
  const b = el("button", cls, label);
  b.type = "button";
  b.addEventListener("click", onClick);
  return b;
}

// -- conversations ------------------------------------------------------------------------------------------------
function newConversation() {
  return {
    id: store.newId(), title: "New chat", created: Date.now(), updated: Date.now(), contextTokens: 0,
    settings: { temperature: state.info.default_generation_settings.temperature, max_tokens: DEFAULT_MAX_TOKENS,
                system: "" },
    messages: [],
  };
}

async function persist(conv) {
  conv.updated = Date.now();
  await store.save(conv);
  state.convs = [conv, ...state.convs.filter((c) => c.id !== conv.id)];
  drawSidebar();
}

function open(conv) {
  if (state.controller) return;
  state.conv = conv;
  localStorage.setItem(LAST_OPEN, conv.id);
  clearComposerError();
  drawSidebar();
  drawSettings();
  drawMessages();
  closeSidebarOnMobile();
}

async function removeConversation(conv) {
  await store.remove(conv.id);
  state.convs = state.convs.filter((c) => c.id !== conv.id);
  if (state.conv.id === conv.id) open(state.convs[0] ?? newConversation());
  else drawSidebar();
}

function drawSidebar() {
  const list = $("conv-list");
  list.replaceChildren();
  const shown = state.convs.some((c) => c.id === state.conv.id) ? state.convs : [state.conv, ...state.convs];
  for (const conv of shown) {
    const li = el("li", conv.id === state.conv.id ? "conv active" : "conv");
    li.dataset.id = conv.id;
    const title = button(conv.title, "conv-title", () => open(conv));
    const rename = button("Rename", "small", () => startRename(li, conv));
    const del = button("Delete", "small danger", () => removeConversation(conv));
    li.append(title, rename, del);
    list.append(li);
  }
  $("conv-title").textContent = state.conv.title;
}

function startRename(li, conv) {
  const input = el("input", "rename");
  input.value = conv.title;
  input.setAttribute("aria-label", "Conversation name");
  li.replaceChildren(input);
  input.focus();
  input.select();
  let done = false;
  const finish = async (keep) => {
    if (done) return;
    done = true;
    if (keep && input.value.trim()) {
      conv.title = input.value.trim();
      await persist(conv);
    } else {
      drawSidebar();
    }
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") finish(true);
    if (e.key === "Escape") { e.stopPropagation(); finish(false); }
  });
  input.addEventListener("blur", () => finish(true));
}

// -- export / import ----------------------------------------------------------------------------------------------
function exportAll() {
  const blob = new Blob([store.exportJson(state.convs)], { type: "application/json" });
  const a = el("a");
  a.href = URL.createObjectURL(blob);
  a.download = `kimivl-edge-chats-${new Date().toISOString().slice(0, 10)}.json`;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
}

async function importFile(file) {
  let convs;
  try {
    convs = store.parseExport(await file.text());
  } catch (e) {
    showComposerError(`Import of ${file.name} failed: ${e.message}`);
    return;
  }
  const taken = new Set(state.convs.map((c) => c.id));
  for (const conv of convs) {
    if (taken.has(conv.id)) conv.id = store.newId();
    await store.save(conv);
  }
  state.convs = await store.loadAll();
  setStatus(`Imported ${convs.length} conversation${convs.length === 1 ? "" : "s"}.`);
  if (convs.length) open(state.convs.find((c) => c.id === convs[0].id));
}

// -- settings ---------------------------------------------------------------------------------------------------
function drawSettings() {
  const s = state.conv.settings;
  $("set-temperature").value = s.temperature ?? state.info.default_generation_settings.temperature;
  $("set-max-tokens").value = s.max_tokens ?? DEFAULT_MAX_TOKENS;
  $("set-max-tokens").max = state.info.n_ctx;
  $("set-system").value = s.system;
}

function readSettings() {
  const t = parseFloat($("set-temperature").value);
  const n = parseInt($("set-max-tokens").value, 10);
  const s = state.conv.settings;
  if (Number.isFinite(t) && t >= 0 && t <= 2) s.temperature = t;
  if (Number.isFinite(n) && n >= 1) s.max_tokens = Math.min(n, state.info.n_ctx);
  s.system = $("set-system").value;
  if (state.conv.messages.length) persist(state.conv);
}

// -- composer: text and images ----------------------------------------------------------------------------------
function showComposerError(text) {
  const box = $("composer-error");
  box.textContent = text;
  box.hidden = false;
}

function clearComposerError() {
  $("composer-error").hidden = true;
  $("composer-error").textContent = "";
}

function readImage(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onerror = () => reject(new Error("the file could not be read"));
    reader.onload = () => {
      const img = new Image();
      img.onload = () => resolve({ url: reader.result, name: file.name || "pasted image", width: img.naturalWidth,
                                   height: img.naturalHeight });
      img.onerror = () => reject(new Error("not an image this browser can read"));
      img.src = reader.result;
    };
    reader.readAsDataURL(file);
  });
}

async function attach(files) {
  clearComposerError();
  for (const file of files) {
    if (!file.type.startsWith("image/")) {
      showComposerError(`${file.name || "That file"} was not attached: not an image.`);
      continue;
    }
    try {
      state.pending.push(await readImage(file));
    } catch (e) {
      showComposerError(`${file.name || "The pasted image"} was not attached: ${e.message}.`);
    }
  }
  drawAttachments();
}

function drawAttachments() {
  const box = $("attachments");
  box.replaceChildren(...state.pending.map((im, k) => {
    const fig = el("figure", "attachment");
    const img = el("img", "thumb");
    img.src = im.url;
    img.alt = im.name;
    fig.append(img, button("×", "remove", () => { state.pending.splice(k, 1); drawAttachments(); }));
    fig.lastChild.setAttribute("aria-label", `Remove ${im.name}`);
    return fig;
  }));
}

// -- turns ------------------------------------------------------------------------------------------------------
function requestMessages(conv) {
  const out = conv.settings.system.trim() ? [{ role: "system", content: conv.settings.system }] : [];
  for (const m of conv.messages) {
    if (m.role === "user") {
      const parts = m.images.map((im) => ({ type: "image_url", image_url: { url: im.url } }));
      out.push({ role: "user", content: [...parts, { type: "text", text: m.text }] });
    } else if (!m.error) {
      out.push({ role: "assistant", content: m.text });
    }
  }
  return out;
}

async function send() {
  const text = $("input").value.trim();
  if (state.controller || (!text && !state.pending.length)) return;
  readSettings();
  const conv = state.conv;
  const user = { role: "user", text, images: state.pending };
  if (conv.title === "New chat") conv.title = text.slice(0, 48) || "Image chat";
  conv.messages.push(user);
  state.pending = [];
  $("input").value = "";
  drawAttachments();
  const refused = await generate(conv);
  if (refused) {  // the request never started: the message goes back to the composer, nothing is kept
    conv.messages.pop();
    $("input").value = user.text;
    state.pending = user.images;
    drawAttachments();
    drawMessages();
  }
}

// Runs one turn on `conv` (whose last message is the user's). Returns the ApiError when the server refused the
// request before it started (shown next to the input), else null.
async function generate(conv) {
  clearComposerError();
  const answer = { role: "assistant", text: "", reasoning: "", stats: null, stopped: false, error: "" };
  const body = { model: state.info.id, messages: requestMessages(conv), temperature: conv.settings.temperature,
                 max_tokens: conv.settings.max_tokens };
  conv.messages.push(answer);
  setBusy(new AbortController());
  const view = drawMessages().at(-1);
  const t0 = performance.now();
  let ttft = null;
  const first = () => { ttft ??= performance.now() - t0; };
  let refused = null;
  try {
    await streamChat(body, state.controller.signal, {
      reasoning: (t) => { first(); answer.reasoning += t; view.update(); },
      content: (t) => { first(); answer.text += t; view.update(); },
      finish: (ch) => {
        answer.stats = turnStats(ch.timings, ttft);
        answer.finish = ch.choices[0].finish_reason;
        answer.grounding = ch.choices[0].delta?.grounding ?? null;  // the server's parsed actions, when any
      },
      usage: (u) => { conv.contextTokens = u.total_tokens; Object.assign(answer.stats ?? {}, usageStats(u)); },
    });
  } catch (e) {
    if (e.name === "AbortError") {
      answer.stopped = true;
    } else if (e instanceof ApiError && !answer.text && !answer.reasoning) {
      refused = e;
    } else {
      answer.error = e.message;
    }
  } finally {
    setBusy(null);
  }
  if (refused) {
    conv.messages.pop();
    showComposerError(refused.refusesImage ? `Image refused: ${refused.message}` : refused.message);
    return refused;
  }
  if (answer.stats) answer.stats.ttft_ms = ttft;
  await persist(conv);
  if (state.conv === conv) drawMessages();
  return null;
}

function turnStats(t, ttft) {
  return t ? { tokens_per_s: t.predicted_per_second, ttft_ms: ttft, image_tokens: t.image_tokens ?? 0,
               prompt_tokens: t.prompt_n + t.cache_n, cached_tokens: t.cache_n, completion_tokens: t.predicted_n }
    : { ttft_ms: ttft };
}

function usageStats(u) {
  return { prompt_tokens: u.prompt_tokens, completion_tokens: u.completion_tokens, total_tokens: u.total_tokens };
}

function stop() {
  state.controller?.abort();
}

function setBusy(controller) {
  state.controller = controller;
  $("send").hidden = !!controller;
  $("stop").hidden = !controller;
  document.body.classList.toggle("busy", !!controller);
}

async function regenerate() {
  const conv = state.conv;
  if (state.controller || conv.messages.at(-1)?.role !== "assistant") return;
  conv.messages.pop();
  await generate(conv);
}

async function resendEdited(index, text) {
  const conv = state.conv;
  if (state.controller) return;
  const old = conv.messages[index];
  conv.messages = [...conv.messages.slice(0, index), { ...old, text }];
  await generate(conv);
}

// -- messages ---------------------------------------------------------------------------------------------------
function drawMessages() {
  const conv = state.conv;
  const box = $("messages");
  const views = conv.messages.map((_, i) => messageView(conv, i));
  box.replaceChildren(...views.map((v) => v.root));
  if (!views.length) box.append(el("p", "empty", "Attach an image (button, drop or paste) and ask about it."));
  drawContext();
  box.scrollTop = box.scrollHeight;
  return views;
}

function drawContext() {
  const used = state.conv.contextTokens ?? 0;
  const pct = Math.min(100, (100 * used) / state.info.n_ctx);
  $("ctx-fill").style.width = `${pct}%`;
  $("ctx-fill").classList.toggle("full", pct > 90);
  $("ctx-bar").setAttribute("aria-valuenow", pct.toFixed(0));
  $("ctx-text").textContent = `${used} / ${state.info.n_ctx}`;
}

function messageView(conv, i) {
  const m = conv.messages[i];
  return m.role === "user" ? userView(conv, i) : assistantView(conv, i);
}

function userView(conv, i) {
  const m = conv.messages[i];
  const root = el("div", "msg user");
  if (m.images.length) {
    const thumbs = el("div", "thumbs");
    for (const im of m.images) {
      const img = el("img", "thumb");
      img.src = im.url;
      img.alt = im.name;
      img.title = `${im.name} (${im.width}×${im.height})`;
      thumbs.append(img);
    }
    root.append(thumbs);
  }
  const body = el("div", "body", m.text);
  const edit = button("Edit", "small", () => startEdit(root, body, i));
  root.append(body, el("div", "actions"));
  root.lastChild.append(edit);
  return { root };
}

function startEdit(root, body, i) {
  if (state.controller) return;
  const area = el("textarea", "edit-box");
  area.value = state.conv.messages[i].text;
  const save = button("Send", "primary", () => resendEdited(i, area.value.trim()));
  const cancel = button("Cancel", "small", () => drawMessages());
  const row = el("div", "actions");
  row.append(save, cancel);
  body.replaceWith(area);
  root.querySelector(".actions").replaceWith(row);
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); save.click(); }
  });
  area.focus();
}

function assistantView(conv, i) {
  const m = conv.messages[i];
  const root = el("div", "msg assistant");
  const thinking = el("details", "thinking");
  thinking.append(el("summary", null, "Thinking"), el("div", "reasoning"));
  const body = el("div", "body markdown");
  const figure = el("div", "grounding");
  const meta = el("div", "meta");
  root.append(thinking, body, figure, meta);
  const live = () => state.controller && i === conv.messages.length - 1;
  const update = () => {
    thinking.hidden = !m.reasoning;
    thinking.lastChild.textContent = m.reasoning;
    if (live()) thinking.open = !m.text;  // open while it thinks, collapsed once the answer starts
    body.replaceChildren(renderMarkdown(m.text));
    if (m.error) body.append(el("p", "error", `Error: ${m.error}`));
    if (m.stopped) body.append(el("p", "stopped", "Stopped."));
    root.classList.toggle("streaming", !!live());
    if (live()) $("messages").scrollTop = $("messages").scrollHeight;
  };
  update();
  if (!live()) {
    drawGrounding(figure, m, referencedImage(conv, i));
    meta.textContent = describeStats(m.stats);
    if (i === conv.messages.length - 1) {
      const actions = el("div", "actions");
      actions.append(button("Regenerate", "small", regenerate));
      root.append(actions);
    }
  }
  return { root, update };
}

function describeStats(s) {
  if (!s) return "";
  const parts = [];
  if (s.tokens_per_s) parts.push(`${s.tokens_per_s.toFixed(1)} tok/s`);
  if (s.ttft_ms != null) parts.push(`TTFT ${Math.round(s.ttft_ms)} ms`);
  if (s.image_tokens) parts.push(`${s.image_tokens} image tokens`);
  if (s.completion_tokens != null) parts.push(`${s.completion_tokens} token${s.completion_tokens === 1 ? "" : "s"}`);
  if (s.cached_tokens) parts.push(`${s.cached_tokens} cached`);
  return parts.join(" · ");
}

// The image an answer's coordinates refer to: the last image sent before it.
function referencedImage(conv, i) {
  for (let k = i - 1; k >= 0; k--) {
    const ims = conv.messages[k].images;
    if (ims?.length) return ims.at(-1);
  }
  return null;
}

function drawGrounding(box, m, image) {
  if (!image || !image.width) return;
  const marks = m.grounding ? marksFromActions(m.grounding) : groundingMarks(m.text, image.width, image.height);
  if (!marks.length) return;
  const frame = el("div", "overlay-frame");
  const img = el("img", "grounded");
  img.src = image.url;
  img.alt = `${image.name} with the answer's points`;
  frame.append(img);
  const pct = (v, full) => `${(100 * v) / full}%`;
  for (const mk of marks) {
    const d = el("div", mk.kind === "box" ? "mark-box" : "mark-point");
    if (mk.kind === "box") {
      Object.assign(d.style, { left: pct(mk.x0, image.width), top: pct(mk.y0, image.height),
                               width: pct(mk.x1 - mk.x0, image.width), height: pct(mk.y1 - mk.y0, image.height) });
    } else {
      Object.assign(d.style, { left: pct(mk.x, image.width), top: pct(mk.y, image.height) });
    }
    d.title = mk.kind === "box" ? `box ${[mk.x0, mk.y0, mk.x1, mk.y1].map(Math.round).join(", ")}`
      : `${mk.label || "point"} (${Math.round(mk.x)}, ${Math.round(mk.y)})`;
    frame.append(d);
  }
  box.append(frame);
}

// -- page -------------------------------------------------------------------------------------------------------
function setStatus(text) {
  $("status").textContent = text;
}

function closeSidebarOnMobile() {
  document.body.classList.remove("sidebar-open");
  $("scrim").hidden = true;
}

function wire() {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.controller) stop(); });
  $("stop").addEventListener("click", stop);
  $("file-input").addEventListener("change", async (e) => { await attach([...e.target.files]); e.target.value = ""; });
  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData?.files ?? [])];
    if (files.length) { e.preventDefault(); attach(files); }
  });
  const main = $("main");
  main.addEventListener("dragover", (e) => { e.preventDefault(); $("drop-hint").hidden = false; });
  main.addEventListener("dragleave", (e) => { if (e.target === main) $("drop-hint").hidden = true; });
  main.addEventListener("drop", (e) => {
    e.preventDefault();
    $("drop-hint").hidden = true;
    attach([...(e.dataTransfer?.files ?? [])]);
  });
  $("new-chat").addEventListener("click", () => open(newConversation()));
  $("export").addEventListener("click", exportAll);
  $("import-file").addEventListener("change", async (e) => {
    if (e.target.files[0]) await importFile(e.target.files[0]);
    e.target.value = "";
  });
  $("toggle-settings").addEventListener("click", () => {
    const s = $("settings");
    s.hidden = !s.hidden;
    $("toggle-settings").setAttribute("aria-expanded", String(!s.hidden));
  });
  $("settings").addEventListener("change", readSettings);
  $("toggle-sidebar").addEventListener("click", () => {
    const on = document.body.classList.toggle("sidebar-open");
    $("scrim").hidden = !on;
  });
  $("scrim").addEventListener("click", closeSidebarOnMobile);
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    setApiKey($("key-input").value.trim());
    connect();
  });
}

async function connect() {
  try {
    state.info = await serverInfo((msg) => setStatus(`${msg}…`));
  } catch (e) {
    $("key-form").hidden = !(e instanceof ApiError && e.status === 401);
    setStatus($("key-form").hidden ? `The server is not available: ${e.message}`
      : `This server needs its API key (${e.message}).`);
    return;
  }
  $("key-form").hidden = true;
  setStatus(`${state.info.id} · context ${state.info.n_ctx}${state.info.thinking ? " · thinking" : ""}`);
  state.convs = await store.loadAll();
  const last = state.convs.find((c) => c.id === localStorage.getItem(LAST_OPEN));
  open(last ?? state.convs[0] ?? newConversation());
  document.body.dataset.ready = "1";
}

wire();
connect();
