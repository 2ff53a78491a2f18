// A small Markdown renderer for untrusted model output. It builds DOM nodes and sets text with textContent only:
// no string ever becomes HTML, so `<img onerror=...>` in an answer is shown as text. Links are kept only for
// http:, https: and mailto: URLs (no javascript:, data:, ...); images in Markdown are shown as their alt text,
// never fetched. Supported: paragraphs, headings, fenced code, lists (flat, ordered or not), tables, block quotes,
// horizontal rules; inline code, **bold**, *italic*, [links](url).

const SAFE_SCHEMES = new Set(["http:", "https:", "mailto:"]);

const FENCE = /^\s*(`{3,}|~{3,})\s*([\w+-]*)/;
const HEADING = /^(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
const ITEM = /^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/;
const QUOTE = /^\s*>\s?(.*)$/;
const TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

function el(tag, cls) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  return e;
}

export function renderMarkdown(text) {
  const frag = document.createDocumentFragment();
  blocks(String(text).replace(/\r\n?/g, "\n").split("\n"), frag);
  return frag;
}

function startsBlock(line, next) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || ITEM.test(line) || QUOTE.test(line) ||
    isTableStart(line, next);
}

function isTableStart(line, next) {
  return line.includes("|") && next !== undefined && next.includes("-") && TABLE_SEP.test(next);
}

function blocks(lines, parent) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) { i++; continue; }
    let m;
    if ((m = FENCE.exec(line))) {
      i = codeBlock(lines, i, m, parent);
    } else if ((m = HEADING.exec(line))) {
      const h = el("h" + Math.min(m[1].length + 2, 6));  // h1/h2 are the page's own
      inline(m[2], h);
      parent.append(h);
      i++;
    } else if (RULE.test(line)) {
      parent.append(el("hr"));
      i++;
    } else if (isTableStart(line, lines[i + 1])) {
      i = table(lines, i, parent);
    } else if (ITEM.test(line)) {
      i = list(lines, i, parent);
    } else if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && (m = QUOTE.exec(lines[i]))) { inner.push(m[1]); i++; }
      const q = el("blockquote");
      blocks(inner, q);
      parent.append(q);
    } else {
      const para = [line];
      i++;
      while (i < lines.length && lines[i].trim() && !startsBlock(lines[i], lines[i + 1])) para.push(lines[i++]);
      const p = el("p");
      inline(para.join("\n"), p);
      parent.append(p);
    }
  }
}

function codeBlock(lines, i, m, parent) {
  const fence = m[1];
  const body = [];
  i++;
  while (i < lines.length && !lines[i].trim().startsWith(fence)) body.push(lines[i++]);
  const pre = el("pre");
  const code = el("code");
  if (m[2]) code.dataset.lang = m[2];
  code.textContent = body.join("\n");
  pre.append(code);
  parent.append(pre);
  return i + 1;  // past the closing fence (or the end: an unclosed fence while streaming)
}

function list(lines, i, parent) {
  const ordered = /\d/.test(ITEM.exec(lines[i])[1]);
  const ul = el(ordered ? "ol" : "ul");
  if (ordered) ul.start = parseInt(ITEM.exec(lines[i])[1], 10);
  let m;
  while (i < lines.length && (m = ITEM.exec(lines[i])) && /\d/.test(m[1]) === ordered) {
    const text = [m[2]];
    i++;
    while (i < lines.length && /^\s{2,}\S/.test(lines[i]) && !ITEM.test(lines[i])) text.push(lines[i++].trim());
    const li = el("li");
    inline(text.join("\n"), li);
    ul.append(li);
  }
  parent.append(ul);
  return i;
}

function cells(line) {
  let s = line.trim();
  if (s.startsWith("|")) s = s.slice(1);
  if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
  return s.split("|").map((c) => c.trim());
}

function table(lines, i, parent) {
  const head = cells(lines[i]);
  const aligns = cells(lines[i + 1]).map((c) => (c.endsWith(":") ? (c.startsWith(":") ? "center" : "right") : ""));
  const t = el("table");
  const thead = el("thead");
  const tr = el("tr");
  head.forEach((c, k) => tr.append(cell("th", c, aligns[k])));
  thead.append(tr);
  t.append(thead);
  const tbody = el("tbody");
  i += 2;
  while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
    const row = el("tr");
    const cs = cells(lines[i]);
    head.forEach((_, k) => row.append(cell("td", cs[k] ?? "", aligns[k])));
    tbody.append(row);
    i++;
  }
  t.append(tbody);
  const wrap = el("div", "table-wrap");
  wrap.append(t);
  parent.append(wrap);
  return i;
}

function cell(tag, text, align) {
  const c = el(tag);
  if (align) c.style.textAlign = align;
  inline(text, c);
  return c;
}

// Inline spans, first match wins: `code`, **bold**, *italic* / _italic_, ![alt](src), [text](url).
const INLINE = /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)|\*\*(?=\S)([\s\S]*?\S)\*\*|(?<![\w*])\*(?=\S)([^*]*?\S)\*(?!\*)|(?<!\w)_(?=\S)([^_]*?\S)_(?!\w)|(!?)\[([^\]\n]*)\]\(\s*([^()\s]*(?:\([^()\s]*\)[^()\s]*)*)\s*\)/;

function inline(text, parent) {
  let rest = text;
  let m;
  while (rest && (m = INLINE.exec(rest))) {
    if (m.index) parent.append(document.createTextNode(rest.slice(0, m.index)));
    if (m[1]) {
      const c = el("code");
      c.textContent = m[2].trim() || m[2];
      parent.append(c);
    } else if (m[3] !== undefined) {
      const b = el("strong");
      inline(m[3], b);
      parent.append(b);
    } else if (m[4] !== undefined || m[5] !== undefined) {
      const e = el("em");
      inline(m[4] ?? m[5], e);
      parent.append(e);
    } else {
      parent.append(link(m[6] === "!", m[7], m[8], m[0]));
    }
    rest = rest.slice(m.index + m[0].length);
  }
  if (rest) parent.append(document.createTextNode(rest));
}

function link(isImage, label, url, source) {
  if (isImage) return document.createTextNode(label ? `[image: ${label}]` : "[image]");  // never fetched
  const href = safeUrl(url);
  if (!href) return document.createTextNode(source);
  const a = el("a");
  a.href = href;
  a.rel = "noopener noreferrer nofollow";
  a.target = "_blank";
  inline(label || href, a);
  return a;
}

export function safeUrl(url) {
  let u;
  try {
    u = new URL(url);  // relative URLs (and anything unparsable) are not links
  } catch {
    return null;
  }
  return SAFE_SCHEMES.has(u.protocol) ? u.href : null;
}
