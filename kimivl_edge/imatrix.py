"""`kimivl-edge imatrix`: an importance matrix for quantization, from calibration chats with images.

    kimivl-edge imatrix CHECKPOINT|MODEL.gguf [--mmproj MMPROJ.gguf] [--calibration FILE.jsonl] -o imatrix.gguf
                        [--limit N] [--ctx N] [--threads N]

Each chat is rendered and its images encoded as ``run`` does (the images' embedding rows injected at their
placeholders), then evaluated by llama.cpp with every position an output, while llama.cpp's eval callback reads
the input of every linear layer (``activations``): per weight, the sum of squared inputs and how many tokens went
in; per routed expert, only the tokens routed to it. The file is llama.cpp's own GGUF imatrix format
(``quant.imatrix_file``): ``kimivl-edge convert --imatrix`` and ``llama-quantize --imatrix`` both take it.

MODEL.gguf should be unquantized (F32, F16, BF16) or Q8_0; without ``--mmproj`` the chats with images are skipped.
A CHECKPOINT directory is first converted to a BF16 text GGUF and an F16 mmproj in a temporary directory beside
the output (removed afterwards; the text file is as large as the checkpoint's language model).
Without ``--calibration``, the built-in set (``calibration``: 320 prompts in 8 languages, 80 generated images).
"""
from __future__ import annotations

import math
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .calibration import Chat, default_chats, read_chats
from .errors import KimiVLError, UsageError
from .quant.imatrix_file import Imatrix, write_imatrix

if TYPE_CHECKING:
    from .activations import Collector
    from .model import KimiVL

SOURCE_TYPES = ("F32", "F16", "BF16", "Q8_0")
DEFAULT_DATASET = "kimivl-edge default calibration set"


@dataclass(frozen=True)
class Collected:
    """What ``collect`` measured: the matrix, and over what."""

    imatrix: Imatrix
    n_chats: int
    n_tokens: int
    n_image_tokens: int
    skipped_image_chats: int

    def unrouted(self) -> list[str]:
        """Expert tensors with experts no calibration token reached (their rows are quantized unweighted)."""
        items = sorted(self.imatrix.entries.items())
        return [f"{n} ({int((e.counts == 0).sum())} of {e.counts.size})" for n, e in items
                if e.counts.size > 1 and (e.counts == 0).any()]


def _check_source(model_gguf: Path) -> None:
    from .errors import GGUFFileError
    from .gguf_file import GGUFFile
    from .gguf_keys import EdgeKeys

    try:
        with GGUFFile(model_gguf, tensors=False) as f:
            ftype = f.get(EdgeKeys.FILE_TYPE)
    except GGUFFileError as e:
        raise UsageError(str(e)) from None
    if ftype is not None and ftype not in SOURCE_TYPES:
        raise UsageError(f"{model_gguf} is {ftype}: collect from an unquantized file ({', '.join(SOURCE_TYPES)}), "
                         "the weights the statistics are for")


def collect(model_gguf: str | Path, mmproj_gguf: str | Path | None, chats: Sequence[Chat], dataset: str, *,
            n_ctx: int = 4096, n_threads: int | None = None,
            progress: Callable[[int, int], None] | None = None) -> Collected:
    """Evaluate ``chats`` on the pair and return the statistics. ``progress(done, total)`` after each chat."""
    from .activations import Collector
    from .model import KimiVL

    _check_source(Path(model_gguf))
    usable = [c for c in chats if mmproj_gguf is not None or not c.n_images]
    if not usable:
        raise UsageError("no calibration chat to evaluate (all hold images and no --mmproj was given)")
    collector = Collector()
    model = KimiVL.load(model_gguf, mmproj_gguf, n_ctx=n_ctx, n_threads=n_threads, kv_type="f32",
                        eval_callback=collector.callback)
    n_tokens = n_image = 0
    try:
        with _ctrl_c_stops(collector):
            for k, chat in enumerate(usable):
                collector.check()
                n, n_img = _evaluate(model, chat, collector)
                n_tokens += n
                n_image += n_img
                if progress is not None:
                    progress(k + 1, len(usable))
    finally:
        model.close()
    im = Imatrix(collector.entries(), (dataset,), len(usable), max(1, math.ceil(n_tokens / len(usable))))
    return Collected(im, len(usable), n_tokens, n_image, len(chats) - len(usable))


def _evaluate(model: KimiVL, chat: Chat, collector: Collector) -> tuple[int, int]:
    """One chat evaluated from an empty cache, every position an output (llama.cpp then runs the last layer on
    every row); returns its (tokens, image tokens)."""
    from .decoder import ImageBlock

    try:
        segments = model.embed_prompt(model.render_prompt(chat.messages))
    except KimiVLError as e:
        raise KimiVLError(f"calibration chat {chat.name}: {e}") from None
    n = len(model.decoder.segment_keys(segments))
    model.decoder.reset()
    try:
        model.decoder.prefill(segments, n_logits=n)
    finally:
        collector.check()
    return n, sum(len(s.rows) for s in segments if isinstance(s, ImageBlock))


@contextmanager
def _ctrl_c_stops(collector: Collector) -> Iterator[None]:
    """Ctrl-C while collecting stops the collector (``Collector.stop``), which raises KeyboardInterrupt at its next
    check; outside the main thread signals are left alone."""
    def handler(signum, frame):
        collector.stop(KeyboardInterrupt())

    try:
        old = signal.signal(signal.SIGINT, handler)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _bar(total_label: str) -> Callable[[int, int], None] | None:
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar: list = []

    def update(done: int, total: int) -> None:
        if not bar:
            bar.append(tqdm(total=total, unit="chat", desc=total_label))
        bar[0].update(done - bar[0].n)
        if done == total:
            bar[0].close()
    return update


def _from_checkpoint(path: Path, workdir: Path, threads: int | None) -> tuple[Path, Path]:
    from .convert import convert_checkpoint

    print(f"converting {path} to BF16 (text) and F16 (mmproj) in {workdir}", file=sys.stderr)
    r = convert_checkpoint(path, "bf16", "f16", workdir, progress=sys.stderr.isatty(), threads=threads)
    return r.text_path, r.mmproj_path


def run(source: str, mmproj: str | None, calibration: str | None, output: Path, *, limit: int | None = None,
        n_ctx: int = 4096, threads: int | None = None) -> Collected:
    """The verb: chats, model files (converted from a checkpoint if need be), collection, the file written
    atomically."""
    from .convert.gguf_out import partial_files

    chats = read_chats(calibration) if calibration else default_chats()
    chats = chats[:limit] if limit else chats
    dataset = calibration or DEFAULT_DATASET
    src = Path(source)
    if not src.exists():
        raise UsageError(f"{source}: no such file or directory")
    output.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        if mmproj:
            raise UsageError("--mmproj goes with a MODEL.gguf; a checkpoint brings its own vision tower")
        with tempfile.TemporaryDirectory(prefix=".kimivl-imatrix-", dir=output.parent) as tmp:
            text, mm = _from_checkpoint(src, Path(tmp), threads)
            got = collect(text, mm, chats, dataset, n_ctx=n_ctx, n_threads=threads, progress=_bar("imatrix"))
    else:
        got = collect(src, Path(mmproj) if mmproj else None, chats, dataset, n_ctx=n_ctx, n_threads=threads,
                      progress=_bar("imatrix"))
    with partial_files([output]) as (part,):
        write_imatrix(part, got.imatrix)
    return got


def main(argv: list[str] | None = None) -> int:
    from .cli import OneLineParser

    ap = OneLineParser(prog="kimivl-edge imatrix", description=__doc__.split("\n\n")[0])
    ap.add_argument("source", metavar="CHECKPOINT|MODEL.gguf", help="checkpoint directory or text GGUF")
    ap.add_argument("--mmproj", help="the mmproj GGUF of MODEL.gguf (without it, chats with images are skipped)")
    ap.add_argument("--calibration", metavar="FILE.jsonl",
                    help='chats, one a line: {"prompt": TEXT, "images": [PATH, ...]} or {"messages": [...]} '
                         "(default: the built-in set)")
    ap.add_argument("-o", "--output", required=True, type=Path, help="the imatrix GGUF to write")
    ap.add_argument("--limit", type=int, help="use only the first N chats")
    ap.add_argument("--ctx", type=int, default=4096, help="context size (default 4096)")
    ap.add_argument("--threads", type=int, help="threads (default: every core)")
    a = ap.parse_args(argv)
    for name in ("limit", "threads"):
        v = getattr(a, name)
        if v is not None and v < 1:
            ap.error(f"--{name} must be at least 1, got {v}")
    got = run(a.source, a.mmproj, a.calibration, a.output, limit=a.limit, n_ctx=a.ctx, threads=a.threads)
    print(f"wrote {a.output}: {len(got.imatrix.entries)} weights, {got.n_chats} chats, {got.n_tokens} tokens "
          f"({got.n_image_tokens} image tokens)")
    if got.skipped_image_chats:
        print(f"skipped {got.skipped_image_chats} chats with images (no --mmproj)", file=sys.stderr)
    for u in got.unrouted():
        print(f"experts no token reached: {u}", file=sys.stderr)
    return 0
