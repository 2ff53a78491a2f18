"""`kimivl-edge demo` (what `make demo` runs) on the bundled trained models: the answers it prints against the
expected ones written in the demo (derived from the drawn scenes), the Thinking model's reasoning printed apart,
and the grounding click drawn on the original screenshot inside the blue square."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image

BLUE = (30, 60, 220)


def test_demo_answers_thinks_and_draws_the_click(tmp_path):
    env = {**os.environ, "KIMIVL_EDGE_BUILD": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "kimivl_edge", "demo"], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stderr
    pairs = re.findall(r"^A: '(.*)'   \(expected: (.*)\)$", r.stdout, re.M)
    assert len(pairs) == 8
    wrong = [(a, e) for a, e in pairs if a != e and not a.startswith("pyautogui")]
    assert not wrong, wrong
    assert len(re.findall(r"^thinking: '.+'$", r.stdout, re.M)) == 2  # the reasoning, apart from the answer
    assert "6 frames" in r.stdout
    m = re.search(r"click at \((\d+), (\d+)\) pixels of the 240x200 original", r.stdout)
    assert m, r.stdout
    x, y = int(m.group(1)), int(m.group(2))
    shot = np.asarray(Image.open(tmp_path / "screen.png").convert("RGB"))
    assert tuple(shot[y, x]) == BLUE  # the click lands on the blue square of the original screenshot
    drawn = np.asarray(Image.open(tmp_path / "screen-answer.png").convert("RGB"))
    assert tuple(drawn[y, x]) == (255, 0, 0)  # the runtime's drawing marks that pixel
