// The server's HTTP API, same origin only: /health, /props, /v1/models, and /v1/chat/completions streamed as
// server-sent events. Aborting the fetch closes the connection, and the server cancels the generation.

export class ApiError extends Error {
  constructor(status, error) {
    super(error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = error?.code ?? null;
    this.param = error?.param ?? null;
  }

  get refusesImage() {
    return /image/.test(this.code ?? "") || /image_url/.test(this.param ?? "");
  }
}

const KEY = "kimivl-edge.api-key";

// The server's --api-key, kept in this browser once the user has typed it.
export function setApiKey(key) {
  localStorage.setItem(KEY, key);
}

function headers(h) {
  const key = localStorage.getItem(KEY);
  return key ? { ...h, Authorization: `Bearer ${key}` } : h;
}

async function json(path) {
  const r = await fetch(path, { headers: headers({ Accept: "application/json" }) });
  const body = await r.json().catch(() => null);
  if (!r.ok) throw new ApiError(r.status, body?.error);
  return body;
}

// The model's id, context size, thinking flag and default temperature; waits while the model loads. Rejects with
// ApiError 401 when the server wants an API key this browser does not have.
export async function serverInfo(onWait) {
  for (;;) {
    try {
      const props = await json("/props");
      const models = await json("/v1/models");
      return { ...props, id: models.data[0].id };
    } catch (e) {
      if (!(e instanceof ApiError) || e.status !== 503 || e.code !== "model_loading") throw e;
      onWait(e.message);
      await new Promise((r) => setTimeout(r, 500));
    }
  }
}

// Streams one chat turn. `on.reasoning(text)`, `on.content(text)` for each delta, `on.finish(chunk)` for the
// chunk with finish_reason (and llama-server's `timings`), `on.usage(usage)`. Rejects with ApiError for an HTTP
// error or an error event, with the fetch's AbortError when `signal` aborts.
export async function streamChat(body, signal, on) {
  const r = await fetch("/v1/chat/completions", {
    method: "POST", signal, headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
  });
  if (!r.ok) {
    const err = await r.json().catch(() => null);
    throw new ApiError(r.status, err?.error);
  }
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
      if (!data) continue;
      if (data === "[DONE]") return;
      dispatch(JSON.parse(data), on);
    }
  }
}

function dispatch(chunk, on) {
  if (chunk.error) throw new ApiError(500, chunk.error);
  if (chunk.usage) on.usage(chunk.usage);
  const choice = chunk.choices?.[0];
  if (!choice) return;
  const d = choice.delta ?? {};
  if (d.reasoning_content) on.reasoning(d.reasoning_content);
  if (d.content) on.content(d.content);
  if (choice.finish_reason) on.finish(chunk);
}
