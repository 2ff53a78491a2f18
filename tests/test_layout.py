"""Guards on the project's shape (issue 20): what a wheel installs, which modules the runtime imports, and that every
"§N" citation points at a section of docs/model.md."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_installs_only_the_kimivl_edge_package(tmp_path):
    """A wheel built from the checkout (its tracked files, with the package's own configuration) holds one top-level
    package, ``kimivl_edge``, with the converter and the quantization code inside it (no generic ``convert`` or
    ``quant`` in site-packages). Built from a copy: setuptools writes build/ and *.egg-info next to the sources."""
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                        "-w", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (wheel,) = (tmp_path / "out").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"kimivl_edge"}, top
    assert {"kimivl_edge/convert/__init__.py", "kimivl_edge/quant/__init__.py"} <= set(names)


def test_the_runtime_tokenizer_does_not_import_the_synth_package():
    """The synthetic-checkpoint code (BPE trainer, vocabulary writers, presets) lives in ``kimivl_edge.synth``;
    the runtime tokenizer must not drag it in. A fresh interpreter, so no other test's imports count."""
    code = ("import sys, kimivl_edge.tokenizer; "
            "print(sorted(m for m in sys.modules if m.split('.')[:2] == ['kimivl_edge', 'synth']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


CITATION = re.compile(r"§(\d+(?:\.\d+)?[a-z]?)(?:[–-]§?(\d+(?:\.\d+)?[a-z]?))?")


def model_sections() -> set[str]:
    """Section numbers of docs/model.md: its numbered headings ("### 10.2 ...") and lettered items ("**10.2a")."""
    text = (ROOT / "docs" / "model.md").read_text(encoding="utf-8")
    headings = re.findall(r"^#+ (\d+(?:\.\d+)?)\.? ", text, flags=re.MULTILINE)
    items = re.findall(r"^- \*\*(\d+\.\d+[a-z]) ", text, flags=re.MULTILINE)
    return set(headings) | set(items)


def citing_files() -> list[Path]:
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    for d in ("kimivl_edge", "training"):
        files += [p for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts]
    return files


def test_every_section_citation_resolves_to_docs_model_md():
    """Code and docs cite the model document as "docs/model.md §N" (or a bare "§N", a range "§13.3–13.5"): each N
    must be a numbered heading of docs/model.md, or one of its lettered items (§10.2a)."""
    sections = model_sections()
    assert {"1", "5.4", "10.2", "10.2a", "13.5"} <= sections  # the parser reads the document's own numbering
    dangling = []
    for path in citing_files():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in CITATION.finditer(line):
                dangling += [f"{path.relative_to(ROOT)}:{n}: §{s}" for s in m.groups() if s and s not in sections]
    assert not dangling, "\n".join(dangling)


def test_media_data_flows_one_way():
    """``kimivl_edge.media`` is layered: ``source`` (inputs, MediaError), then ``settings``, then ``video`` and
    ``document`` (neither imports the other), then ``expand``, which drives them. Read from each module's own
    source: every relative import of a sibling points to a lower layer."""
    layer = {"source": 0, "settings": 1, "video": 2, "document": 2, "expand": 3}
    pkg = ROOT / "kimivl_edge" / "media"
    assert {p.stem for p in pkg.glob("*.py")} == {"__init__", *layer}
    upward = [f"{name} -> {m.group(1)}" for name in layer
              for m in re.finditer(r"^from \.(\w+) import", (pkg / f"{name}.py").read_text(encoding="utf-8"),
                                   re.MULTILINE)
              if layer[m.group(1)] >= layer[name]]
    assert not upward, upward
