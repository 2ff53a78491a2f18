"""PDF: which pages to render (page sizes only) and rendering them through pypdfium2. Each page is rendered at the
scale that fills its own patch budget, so no page is rendered large and then shrunk by the processor
(docs/model.md §4.2)."""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..errors import UsageError, one_line
from .settings import Geometry, MediaSettings
from .source import MediaError, Source, as_source


@dataclass(frozen=True)
class DocumentPlan:
    """Which pages of a PDF become images: 1-based ``pages``, the scale (pixels per point) and size each is
    rendered at, its image tokens, and a note naming the dropped pages ("" when none)."""

    source: Source
    n_pages: int
    pages: tuple[int, ...]
    scales: tuple[float, ...]
    sizes: tuple[tuple[int, int], ...]
    tokens: tuple[int, ...]
    note: str


def parse_pages(spec: str | None, n_pages: int) -> list[int]:
    """1-based pages of "1-3,5,9-" (open ends allowed; order kept, duplicates dropped); None means all. Ranges are
    clipped to the document; a page or range starting past its end is an error."""
    if spec is None or not str(spec).strip():
        return list(range(1, n_pages + 1))
    out: list[int] = []
    for item in str(spec).split(","):
        m = re.fullmatch(r"\s*(\d*)\s*(-?)\s*(\d*)\s*", item)
        if not m or not (m.group(1) or m.group(3)) or (not m.group(2) and not m.group(1)):
            raise UsageError(f"pages {spec!r}: {item.strip()!r} is not a page or a range like 3-7")
        first = int(m.group(1)) if m.group(1) else 1
        last = (int(m.group(3)) if m.group(3) else n_pages) if m.group(2) else first
        if first < 1 or last < first:
            raise UsageError(f"pages {spec!r}: {item.strip()!r} is not a valid range (pages count from 1)")
        if first > n_pages:
            raise UsageError(f"pages {spec!r}: page {first} does not exist (the document has {n_pages} pages)")
        out += [p for p in range(first, min(last, n_pages) + 1) if p not in out]
    return out


def _ranges(pages: Sequence[int]) -> str:
    """[3, 4, 5, 9] -> "3-5, 9"."""
    out, i = [], 0
    while i < len(pages):
        j = i
        while j + 1 < len(pages) and pages[j + 1] == pages[j] + 1:
            j += 1
        out.append(str(pages[i]) if i == j else f"{pages[i]}-{pages[j]}")
        i = j + 1
    return ", ".join(out)


def _open_pdf(source: Source):
    import pypdfium2 as pdfium

    try:
        pdf = pdfium.PdfDocument(source.path if source.path is not None else source.data)
    except pdfium.PdfiumError as e:
        if "password" in str(e).lower():
            raise MediaError(f"{source.name}: the PDF is password-protected (decrypt it first)") from None
        # PDFium also refuses a PDF with an empty page tree, as "Data format error"
        raise MediaError(f"{source.name}: not a readable PDF, or one without pages ({one_line(e)})") from None
    if len(pdf) == 0:
        pdf.close()
        raise MediaError(f"{source.name}: the PDF has no pages")
    return pdf


def _page_scale(w_pt: float, h_pt: float, cap: int) -> float:
    """Pixels per point that make a w_pt x h_pt page about ``cap`` patches (14x14 pixels each)."""
    return math.sqrt(cap * 196 / (w_pt * h_pt))


def _render_size(w_pt: float, h_pt: float, scale: float) -> tuple[int, int]:
    """pypdfium2's bitmap size for a page at ``scale`` (``PdfPage.render``: ceil(side * scale))."""
    return max(1, math.ceil(w_pt * scale)), max(1, math.ceil(h_pt * scale))


def plan_document(src: Any, settings: MediaSettings, geometry: Geometry, pages: str | None = None,
                  name: str | None = None) -> DocumentPlan:
    """Page sizes only: the pages to render (``pages`` ranges, then ``max_pages``, then ``document_tokens``, in
    page order), their scales and costs. Raises MediaError for encrypted, broken or empty PDFs."""
    source = as_source(src, "document", name)
    pdf = _open_pdf(source)
    try:
        n_pages = len(pdf)
        wanted = parse_pages(pages, n_pages)
        sizes_pt = [pdf.get_page_size(p - 1) for p in wanted[:settings.max_pages]]
    finally:
        pdf.close()
    costed = []
    for p, (w_pt, h_pt) in zip(wanted, sizes_pt):
        if w_pt <= 0 or h_pt <= 0:
            raise MediaError(f"{source.name}: page {p} has no area ({w_pt}x{h_pt} points)")
        scale = _page_scale(w_pt, h_pt, settings.page_patches)
        costed.append((p, scale, *geometry.fit(*_render_size(w_pt, h_pt, scale), settings.page_patches)))
    kept, total = 0, 0
    while kept < len(costed) and total + costed[kept][3] <= settings.document_tokens:
        total += costed[kept][3]
        kept += 1
    if not kept:
        raise MediaError(f"{source.name}: page {wanted[0]} alone needs {costed[0][3]} image tokens, over the "
                         f"document budget of {settings.document_tokens}: raise document_tokens (--doc-tokens) or "
                         "lower page_patches (--page-patches)")
    over_budget = [c[0] for c in costed[kept:]]
    drops = []
    if len(wanted) > settings.max_pages:
        drops.append(f"pages {_ranges(wanted[settings.max_pages:])} dropped (max_pages {settings.max_pages}, "
                     "--max-pages)")
    if over_budget:
        drops.append(f"pages {_ranges(over_budget)} dropped (document_tokens {settings.document_tokens}, "
                     "--doc-tokens)")
    note = f"{source.name}: " + "; ".join(drops) if drops else ""
    use = costed[:kept]
    return DocumentPlan(source, n_pages, tuple(c[0] for c in use), tuple(c[1] for c in use),
                        tuple(c[2] for c in use), tuple(c[3] for c in use), note)


def render_document(plan: DocumentPlan) -> list[Image.Image]:
    """The planned pages as RGB images at their planned sizes, in order."""
    import pypdfium2 as pdfium

    pdf = _open_pdf(plan.source)
    out = []
    try:
        for p, scale, size in zip(plan.pages, plan.scales, plan.sizes):
            page = pdf[p - 1]
            try:
                img = page.render(scale=scale).to_pil().convert("RGB")
            finally:
                page.close()
            out.append(img if img.size == size else img.resize(size, Image.Resampling.BICUBIC))
    except pdfium.PdfiumError as e:
        raise MediaError(f"{plan.source.name}: page could not be rendered ({one_line(e)})") from None
    finally:
        pdf.close()
    return out
