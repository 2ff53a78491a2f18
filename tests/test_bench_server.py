"""`kimivl-edge bench` section 6 (the server over loopback against the in-process API), run for real on the trained
tiny model with one thread and one run: every field is there, the figures are finite, the follow-up question is
answered, and bench.md renders the table. No absolute time is asserted."""
from __future__ import annotations

import math
from pathlib import Path

from kimivl_edge.bench.harness import Children
from kimivl_edge.bench.server import CLIENTS, PARALLEL, server_markdown, server_section

ASSET = Path(__file__).resolve().parents[1] / "kimivl_edge" / "assets" / "kimi-vl-tiny"
SIDE = {"ttft", "decode_tps", "followup"}
FIELDS = {"files", "n_ctx", "decode_tokens", "image", "inprocess", "http", "http_over_inprocess_ttft",
          "http_over_inprocess_decode_tps", "aggregate_tps"}


def test_server_section_smoke(converted, tmp_path):
    text, mmproj = converted(ASSET, "f32", "f32")
    s = server_section(Children(tmp_path, 1), text, mmproj, runs=1, decode_tokens=8)
    assert set(s) == FIELDS
    for side in ("inprocess", "http"):
        assert set(s[side]) == SIDE
        for k in SIDE:
            st = s[side][k]
            assert len(st["values"]) == 1 and all(math.isfinite(v) and v >= 0 for v in st["values"])
        assert s[side]["ttft"]["median"] > 0 and s[side]["followup"]["median"] > 0
    assert s["http_over_inprocess_ttft"] > 0
    assert set(s["aggregate_tps"]) == {str(p) for p in PARALLEL}
    for by_clients in s["aggregate_tps"].values():
        assert set(by_clients) == {str(c) for c in CLIENTS}
        assert all(len(v["values"]) == 1 and v["median"] > 0 for v in by_clients.values())
    md = "\n".join(server_markdown({"server": s}))
    assert "## 6. Server over loopback" in md and md.count("\n| ") >= 3 + 2 + len(CLIENTS)
    assert "`--parallel 4`" in md
