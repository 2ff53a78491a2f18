"""What llama.cpp's own multimodal path does with our GGUF pair, measured on the trained tiny model.

    python -m training.llama_compat [--n 35] [--seed 1000] [--ckpt kimivl_edge/assets/kimi-vl-tiny]

The checkpoint is converted by our converter (Q8_0 text, F16 mmproj: the converter's defaults), and held-out
questions of the single-image tasks and "compare" (tasks.SINGLE_TASKS, cycled as training.evaluate cycles them; the
video and document tasks, up to 12 images each, are left out: libmtmd frames every image the same way) are answered
greedily, at most training.evaluate.MAX_NEW_TOKENS tokens, in four ways:

- ``kimivl-edge``: our runtime (``KimiVL``: HF-exact preprocessing and prompt, numpy vision, llama.cpp decoder);
- ``llama.cpp --jinja``: ``libmtmd`` of llama-cpp-python, the library llama-mtmd-cli and llama-server use for images.
  The GGUF's chat template is rendered with each image part replaced by a part holding the media marker (what
  llama-server does with an OpenAI ``image_url`` part, and llama-cpp-python's ``MTMDChatHandler`` too), then
  ``mtmd_tokenize`` tokenizes the text with llama.cpp's tokenizer and puts each image, wrapped as libmtmd wraps it,
  where its marker was; ``mtmd_helper_eval_chunks`` encodes the images with llama.cpp's clip and prefills.
- ``llama.cpp legacy``: the same, but the prompt comes from llama.cpp's built-in template for this family
  (``llama_chat_apply_template``, what ``common_chat_templates_apply_legacy`` calls when ``--jinja`` is off), the
  content being the markers followed by the question, as ``llama-mtmd-cli -p "<__media__>question"`` sends it.
- ``workaround``: the ``--jinja`` prompt with the template's ``image<|media_content|>`` text put before each marker:
  a raw prompt a user can send to llama-server's ``/completion`` (``prompt_string`` + ``multimodal_data``).

Prints correct counts per task and in total; ``--json`` also writes them with the answers.
"""
from __future__ import annotations

import argparse
import ctypes
import io
import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kimivl_edge.decoder import model_params

from .tasks import Question

DEFAULT_CKPT = Path(__file__).resolve().parent.parent / "kimivl_edge" / "assets" / "kimi-vl-tiny"
TEMPLATE_IMAGE_TEXT = "image<|media_content|>"
"""What the Kimi-VL chat template writes between ``<|media_start|>`` and the image, and libmtmd does not."""
WAYS = ("kimivl-edge", "llama.cpp --jinja", "llama.cpp legacy", "workaround")

_LOG_CB = None  # keeps the ctypes log callback alive


def _quiet() -> None:
    """Silence llama.cpp's and libmtmd's logs (they go to stderr otherwise)."""
    global _LOG_CB
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    if _LOG_CB is None:
        _LOG_CB = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p(0))
    mtmd.mtmd_log_set(_LOG_CB, ctypes.c_void_p(0))
    mtmd.mtmd_helper_log_set(_LOG_CB, ctypes.c_void_p(0))


def media_marker() -> str:
    """libmtmd's default media marker (``<__media__>``), the placeholder its tools put where an image goes."""
    import llama_cpp.mtmd_cpp as mtmd

    marker: bytes = mtmd.mtmd_default_marker()
    return marker.decode("utf-8")


@dataclass(frozen=True)
class Chunk:
    """One chunk of ``mtmd_tokenize``'s output: text token ids, or an image of ``n_tokens`` = ``nx * ny`` rows."""

    kind: str                    # "text" or "image"
    tokens: tuple[int, ...] = ()  # text chunks only
    n_tokens: int = 0
    nx: int = 0
    ny: int = 0


class Mtmd:
    """A text GGUF loaded by llama.cpp plus our mmproj loaded by ``libmtmd`` (``mtmd_init_from_file``), driven the way
    llama-mtmd-cli drives them: ``mtmd_tokenize`` with the default marker, ``mtmd_helper_eval_chunks``, then greedy
    decoding one token at a time."""

    def __init__(self, text_gguf: Path, mmproj_gguf: Path, n_ctx: int = 1024, threads: int = 1) -> None:
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        self.text_gguf, self.mmproj_gguf, self.n_ctx = Path(text_gguf), Path(mmproj_gguf), n_ctx
        _quiet()
        llama_cpp.llama_backend_init()
        self._model: Any = llama_cpp.llama_model_load_from_file(str(self.text_gguf).encode(), model_params())
        self._ctx: Any = None
        self._mctx: Any = None
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {self.text_gguf}")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_ctx, n_ctx
        cp.n_threads = cp.n_threads_batch = threads
        self._ctx = llama_cpp.llama_init_from_model(self._model, cp)
        mp = mtmd.mtmd_context_params_default()
        mp.use_gpu, mp.print_timings, mp.warmup, mp.n_threads = False, False, False, threads
        self._mctx = mtmd.mtmd_init_from_file(str(self.mmproj_gguf).encode(), self._model, mp)
        if not self._ctx or not self._mctx:
            self.close()
            raise RuntimeError(f"libmtmd could not load {self.mmproj_gguf} with {self.text_gguf}")
        self._vocab: Any = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self._vocab)

    def close(self) -> None:
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        if self._mctx:
            mtmd.mtmd_free(self._mctx)
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
        if self._model:
            llama_cpp.llama_model_free(self._model)
        self._mctx = self._ctx = self._model = None

    def __enter__(self) -> "Mtmd":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- templates ----------------------------------------------------------------------------------------------
    def chat_template(self) -> str:
        """The GGUF's ``tokenizer.chat_template``, as llama.cpp reads it."""
        import llama_cpp

        tpl: bytes | None = llama_cpp.llama_model_chat_template(self._model, None)
        if not tpl:
            raise RuntimeError(f"{self.text_gguf} has no chat template")
        return tpl.decode("utf-8")

    def legacy_prompt(self, messages: Sequence[tuple[str, str]], add_assistant: bool = True) -> str:
        """llama.cpp's built-in (non-jinja) rendering of ``(role, content)`` messages for this GGUF's template:
        ``llama_chat_apply_template``, which detects the family from the template text."""
        import llama_cpp

        chat = (llama_cpp.llama_chat_message * len(messages))(
            *[llama_cpp.llama_chat_message(r.encode(), c.encode()) for r, c in messages])
        tpl = self.chat_template().encode()
        size = 4096 + sum(len(c) for _, c in messages) * 2
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_chat_apply_template(tpl, chat, len(messages), add_assistant, buf, size)
        if n < 0 or n > size:
            raise RuntimeError(f"llama_chat_apply_template failed ({n})")
        return buf.raw[:n].decode("utf-8")

    # -- prompts ------------------------------------------------------------------------------------------------
    def _tokenize(self, prompt: str, images: Sequence[Any]) -> Any:
        import llama_cpp.mtmd_cpp as mtmd

        bitmaps = []
        for img in images:
            png = io.BytesIO()
            img.save(png, format="PNG")
            data = bytearray(png.getvalue())
            bm = mtmd.mtmd_helper_bitmap_init_from_buf(self._mctx, (ctypes.c_uint8 * len(data)).from_buffer(data),
                                                       len(data), False)
            if not bm:
                raise RuntimeError("libmtmd could not decode an image")
            bitmaps.append(bm)
        raw = prompt.encode("utf-8")
        text = mtmd.mtmd_input_text()
        text.text, text.text_len, text.add_special, text.parse_special = raw, len(raw), True, True
        chunks = mtmd.mtmd_input_chunks_init()
        arr = (mtmd.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
        res = mtmd.mtmd_tokenize(self._mctx, chunks, ctypes.byref(text), arr, len(bitmaps))
        for bm in bitmaps:
            mtmd.mtmd_bitmap_free(bm)
        if res != 0:
            mtmd.mtmd_input_chunks_free(chunks)
            raise RuntimeError(f"mtmd_tokenize failed ({res}): {len(images)} image(s) for the markers in the prompt")
        return chunks

    def chunks(self, prompt: str, images: Sequence[Any]) -> list[Chunk]:
        """``mtmd_tokenize``'s chunks for ``prompt`` (text with one media marker per image) and PIL ``images``."""
        import llama_cpp.mtmd_cpp as mtmd

        raw = self._tokenize(prompt, images)
        out: list[Chunk] = []
        try:
            for i in range(mtmd.mtmd_input_chunks_size(raw)):
                c = mtmd.mtmd_input_chunks_get(raw, i)
                if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    ptr = mtmd.mtmd_input_chunk_get_tokens_text(c, ctypes.byref(n))
                    out.append(Chunk("text", tuple(ptr[j] for j in range(n.value)), n.value))
                else:
                    it = mtmd.mtmd_input_chunk_get_tokens_image(c)
                    out.append(Chunk("image", (), mtmd.mtmd_input_chunk_get_n_tokens(c),
                                     mtmd.mtmd_image_tokens_get_nx(it), mtmd.mtmd_image_tokens_get_ny(it)))
        finally:
            mtmd.mtmd_input_chunks_free(raw)
        return out

    # -- generation ---------------------------------------------------------------------------------------------
    def generate(self, prompt: str, images: Sequence[Any], max_tokens: int) -> str:
        """Greedy answer to ``prompt`` (stops at an end-of-generation token, as llama-mtmd-cli does)."""
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        chunks = self._tokenize(prompt, images)
        n_past = llama_cpp.llama_pos(0)
        try:
            res = mtmd.mtmd_helper_eval_chunks(self._mctx, self._ctx, chunks, 0, 0, self.n_ctx, True,
                                               ctypes.byref(n_past))
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
        if res != 0:
            raise RuntimeError(f"mtmd_helper_eval_chunks failed ({res})")
        batch = llama_cpp.llama_batch_init(1, 0, 1)
        pieces: list[bytes] = []
        buf = ctypes.create_string_buffer(256)
        pos = n_past.value
        try:
            for _ in range(max_tokens):
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, -1), shape=(self.n_vocab,))
                tok = int(np.argmax(logits))
                if llama_cpp.llama_vocab_is_eog(self._vocab, tok):
                    break
                n = llama_cpp.llama_token_to_piece(self._vocab, tok, buf, len(buf), 0, False)
                pieces.append(buf.raw[:n])
                batch.n_tokens = 1
                batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.logits[0] = tok, pos, 1, 1
                batch.seq_id[0][0] = 0
                if llama_cpp.llama_decode(self._ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")
                pos += 1
        finally:
            llama_cpp.llama_batch_free(batch)
        return b"".join(pieces).decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------------------------
# The prompts of each way


def marker_messages(messages: list[dict[str, Any]], marker_text: str) -> list[dict[str, Any]]:
    """``messages`` with every image part replaced by ``{"type": "media_marker", "text": marker_text}``, what
    llama-server does to an OpenAI ``image_url`` part before it renders the template
    (tools/server/server-common.cpp); the template writes such a part's text."""
    from kimivl_edge.prompt import is_image_part

    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "media_marker", "text": marker_text} if is_image_part(p) else p for p in content]
        out.append({**m, "content": content})
    return out


def jinja_prompt(template: str, messages: list[dict[str, Any]], marker_text: str) -> str:
    """The template rendered with each image as ``marker_text`` (jinja2's sandbox, as ``MTMDChatHandler`` renders
    it; llama-server ``--jinja`` renders the same template with its own engine)."""
    from kimivl_edge.prompt import render

    return render(template, marker_messages(messages, marker_text), add_generation_prompt=True)


def legacy_messages(messages: list[dict[str, Any]], marker: str) -> list[tuple[str, str]]:
    """One string per message: the markers, then the text, as ``llama-mtmd-cli -p "<__media__>…"`` sends it."""
    from kimivl_edge.prompt import is_image_part

    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = "".join(marker if is_image_part(p) else p["text"] for p in content)
        out.append((m["role"], content))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Measurement


def measure(text_gguf: Path, mmproj_gguf: Path, questions: list[Question], threads: int = 1) -> dict[str, list[str]]:
    """{way: [answer per question]} for the four ways of the module docstring."""
    from kimivl_edge.model import KimiVL

    from .evaluate import MAX_NEW_TOKENS

    answers: dict[str, list[str]] = {w: [] for w in WAYS}
    with KimiVL.load(text_gguf, mmproj_gguf, n_ctx=1024, n_threads=threads) as m:
        for q in questions:
            answers["kimivl-edge"].append(m.generate(q.messages(), temperature=0, max_tokens=MAX_NEW_TOKENS).text)
    marker = media_marker()
    with Mtmd(text_gguf, mmproj_gguf, threads=threads) as mt:
        template = mt.chat_template()
        for q in questions:
            msgs = q.messages()
            images = [s.render() for s in q.scenes]
            prompts = {
                "llama.cpp --jinja": jinja_prompt(template, msgs, marker),
                "llama.cpp legacy": mt.legacy_prompt(legacy_messages(msgs, marker)),
                "workaround": jinja_prompt(template, msgs, TEMPLATE_IMAGE_TEXT + marker),
            }
            for way, prompt in prompts.items():
                answers[way].append(mt.generate(prompt, images, MAX_NEW_TOKENS))
    return answers


def counts(questions: list[Question], answers: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """{way: {task: correct, ..., "all": correct}} plus {"questions": {task: n, "all": n}}."""
    from .tasks import is_correct

    tasks = list(dict.fromkeys(q.task for q in questions))
    out: dict[str, dict[str, int]] = {"questions": {t: sum(q.task == t for q in questions) for t in tasks}}
    out["questions"]["all"] = len(questions)
    for way, ans in answers.items():
        ok = [is_correct(q, a) for q, a in zip(questions, ans)]
        per = {t: sum(k for q, k in zip(questions, ok) if q.task == t) for t in tasks}
        per["all"] = sum(ok)
        out[way] = per
    return out


def format_table(table: dict[str, dict[str, int]]) -> str:
    keys = list(table["questions"])
    ways = [w for w in table if w != "questions"]
    lines = [f"{'task':8s} {'n':>3s} " + " ".join(f"{w:>18s}" for w in ways)]
    for k in keys:
        lines.append(f"{k:8s} {table['questions'][k]:3d} " + " ".join(f"{table[w][k]:18d}" for w in ways))
    return "\n".join(lines)


def run(ckpt: Path, n: int, seed: int, outtype: str, mmproj_type: str, threads: int) -> dict[str, Any]:
    from kimivl_edge.convert import convert_checkpoint

    from .tasks import SINGLE_TASKS, question_set

    questions = question_set(seed, n, SINGLE_TASKS)
    with tempfile.TemporaryDirectory() as tmp:
        text, mmproj = convert_checkpoint(ckpt, outtype, mmproj_type, Path(tmp), threads=threads)
        answers = measure(text, mmproj, questions, threads)
    return {"n": n, "seed": seed, "outtype": outtype, "mmproj_type": mmproj_type,
            "counts": counts(questions, answers), "answers": answers,
            "reference_answers": [q.answer for q in questions], "tasks": [q.task for q in questions]}


def main(argv: list[str] | None = None) -> int:
    from .evaluate import EVAL_SEED

    ap = argparse.ArgumentParser(prog="python -m training.llama_compat", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT)
    ap.add_argument("--n", type=int, default=35)
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    ap.add_argument("--outtype", default="q8_0", help="text GGUF type (default q8_0)")
    ap.add_argument("--mmproj-type", default="f16", help="mmproj GGUF type (default f16)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write counts and answers here")
    args = ap.parse_args(argv)
    result = run(args.ckpt, args.n, args.seed, args.outtype, args.mmproj_type, args.threads)
    print(f"{args.n} held-out questions (seed {args.seed}), {args.outtype.upper()} text + "
          f"{args.mmproj_type.upper()} mmproj, greedy; correct answers:")
    print(format_table(result["counts"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
