// Points and boxes in an answer, in pixels of the image they refer to (the last image of the prompt). The server
// sends the actions it parsed (kimivl_edge/grounding.py) in the final chunk's `delta.grounding`; the page draws
// those when present (`marksFromActions`) and parses the text itself otherwise (`groundingMarks`).
// Kimi-VL writes PyAutoGUI calls and boxes normalized to 0-1 of the image (`pyautogui.click(x=0.41, y=0.73)`,
// `{"bbox_2d": [x0, y0, x1, y1]}`, bare `(x=0.5, y=0.5)`); the trained tiny model writes `(x, y)` in image
// pixels. A set of coordinates that are all within 0-1 is read as normalized, otherwise as pixels. Anything
// outside the image, or a box whose corners are out of order, is left out. The same rules as
// kimivl_edge/grounding.py, written again here because the page parses the streamed text itself.

const NUM = String.raw`[-+]?(?:\d+(?:\.\d*)?|\.\d+)`;
const CALL = new RegExp(String.raw`pyautogui\s*\.\s*(\w+)\s*\(([^()]*)\)`, "g");
const KW = (name) => new RegExp(String.raw`\b${name}\s*=\s*(${NUM})`);
const POINT = new RegExp(String.raw`\(\s*(?:x\s*=\s*)?(${NUM})\s*,\s*(?:y\s*=\s*)?(${NUM})\s*\)`, "g");
const BOX = new RegExp(String.raw`["']bbox_2d["']\s*:\s*\[\s*(${NUM})\s*,\s*(${NUM})\s*,\s*(${NUM})\s*,\s*(${NUM})\s*\]`, "g");

function toPixels(values, width, height) {
  const normalized = values.every((v) => v >= 0 && v <= 1);
  const px = values.map((v, k) => (normalized ? v * (k % 2 ? height : width) : v));
  const inside = px.every((v, k) => v >= 0 && v <= (k % 2 ? height : width));
  return inside ? px : null;
}

// [{kind: "point", x, y} | {kind: "box", x0, y0, x1, y1}] in pixels of a width x height image, in text order.
export function groundingMarks(text, width, height) {
  const found = [];
  const covered = [];
  for (const m of text.matchAll(CALL)) {
    covered.push([m.index, m.index + m[0].length]);
    const x = KW("x").exec(m[2]);
    const y = KW("y").exec(m[2]);
    const px = x && y ? toPixels([+x[1], +y[1]], width, height) : null;
    if (px) found.push({ at: m.index, kind: "point", x: px[0], y: px[1], label: m[1] });
  }
  for (const m of text.matchAll(BOX)) {
    covered.push([m.index, m.index + m[0].length]);
    const px = toPixels(m.slice(1, 5).map(Number), width, height);
    if (px && px[0] <= px[2] && px[1] <= px[3]) {
      found.push({ at: m.index, kind: "box", x0: px[0], y0: px[1], x1: px[2], y1: px[3] });
    }
  }
  for (const m of text.matchAll(POINT)) {
    if (covered.some(([a, b]) => m.index >= a && m.index < b)) continue;
    const px = toPixels([+m[1], +m[2]], width, height);
    if (px) found.push({ at: m.index, kind: "point", x: px[0], y: px[1], label: "" });
  }
  return found.sort((a, b) => a.at - b.at);
}

// The same marks from the server's `grounding` actions ({kind, points: [[x, y]], boxes: [[x0, y0, x1, y1]]}).
export function marksFromActions(actions) {
  return actions.flatMap((a) => [
    ...a.points.map(([x, y]) => ({ kind: "point", x, y, label: a.kind === "point" ? "" : a.kind })),
    ...a.boxes.map(([x0, y0, x1, y1]) => ({ kind: "box", x0, y0, x1, y1 })),
  ]);
}
