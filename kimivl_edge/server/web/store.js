// Conversations in the browser's IndexedDB (images included, as data: URLs), one record per conversation, and
// their JSON export/import format.

const DB = "kimivl-edge";
const STORE = "conversations";
export const EXPORT_FORMAT = "kimivl-edge-chats";

let dbPromise = null;

function db() {
  dbPromise ??= new Promise((resolve, reject) => {
    const req = indexedDB.open(DB, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(STORE, { keyPath: "id" });
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
  return dbPromise;
}

async function run(mode, fn) {
  const d = await db();
  return new Promise((resolve, reject) => {
    const tx = d.transaction(STORE, mode);
    const req = fn(tx.objectStore(STORE));
    tx.oncomplete = () => resolve(req?.result);
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error);
  });
}

export const loadAll = async () => ((await run("readonly", (s) => s.getAll())) ?? [])
  .sort((a, b) => b.updated - a.updated);
export const save = (conv) => run("readwrite", (s) => s.put(conv));
export const remove = (id) => run("readwrite", (s) => s.delete(id));

export function newId() {
  return `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;
}

export function exportJson(convs) {
  return JSON.stringify({ format: EXPORT_FORMAT, version: 1, exported: new Date().toISOString(),
                          conversations: convs }, null, 1);
}

// The conversations of an export file, checked field by field (the file is untrusted: only strings, numbers and
// data:image URLs survive). Throws an Error with a one-line message when the file is not an export.
export function parseExport(text) {
  let doc;
  try {
    doc = JSON.parse(text);
  } catch {
    throw new Error("not a JSON file");
  }
  if (!doc || doc.format !== EXPORT_FORMAT || !Array.isArray(doc.conversations)) {
    throw new Error(`not a kimivl-edge chat export (expected "format": "${EXPORT_FORMAT}")`);
  }
  return doc.conversations.map(cleanConversation);
}

const str = (v, d = "") => (typeof v === "string" ? v : d);
const num = (v, d) => (typeof v === "number" && Number.isFinite(v) ? v : d);

function cleanConversation(c) {
  const s = c?.settings ?? {};
  return {
    id: str(c?.id) || newId(),
    title: str(c?.title, "Imported chat"),
    created: num(c?.created, Date.now()),
    updated: num(c?.updated, Date.now()),
    contextTokens: num(c?.contextTokens, 0),
    settings: { temperature: num(s.temperature, null), max_tokens: num(s.max_tokens, null), system: str(s.system) },
    messages: (Array.isArray(c?.messages) ? c.messages : []).map(cleanMessage).filter(Boolean),
  };
}

function cleanMessage(m) {
  if (m?.role === "user") {
    const images = (Array.isArray(m.images) ? m.images : [])
      .filter((im) => str(im?.url).startsWith("data:image/"))
      .map((im) => ({ url: im.url, name: str(im.name, "image"), width: num(im.width, 0), height: num(im.height, 0) }));
    return { role: "user", text: str(m.text), images };
  }
  if (m?.role === "assistant") {
    const st = m.stats && typeof m.stats === "object" ? m.stats : null;
    const stats = st && Object.fromEntries(Object.entries(st).filter(([, v]) => typeof v === "number"));
    return { role: "assistant", text: str(m.text), reasoning: str(m.reasoning), stats, stopped: m.stopped === true,
             error: str(m.error) };
  }
  return null;
}
