"""The whole fp32 reference on a tiny synthetic checkpoint: loading, prompt framing, image injection, generation.

The per-stage numerics are checked against transformers in test_oracle_text.py / test_oracle_vision.py; this file
checks that the stages are wired together as docs/model.md says (§4 token counts, §7 framing, §9.1 injection).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kimivl_edge.errors import CheckpointError
from kimivl_edge.reference.model import ReferenceModel
from kimivl_edge.reference.run import build_messages


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint) -> Path:
    return tiny_checkpoint("instruct", seed=3)


@pytest.fixture(scope="module")
def model(ckpt) -> ReferenceModel:
    return ReferenceModel(ckpt)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    out = []
    for w, h in [(100, 60), (224, 168)]:  # 100x60 -> grid 6x8 (pads to 112x84); 224x168 -> 12x16
        p = d / f"{w}x{h}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        out.append(str(p))
    return out


def test_prompt_framing_and_media_expansion(model: ReferenceModel, images):
    tok = model.tokenizer
    p = model.prepare(build_messages("What is this?", images))
    assert p.grid_hws.tolist() == [[6, 8], [12, 16]]  # §4: pad to multiples of 28, grid = size / 14
    ids = p.input_ids
    pad = model.config.media_placeholder_token_id
    assert ids.count(pad) == 6 * 8 // 4 + 12 * 16 // 4
    # HF framing around each image: <|media_start|> "image" <|media_content|> pads <|media_end|>
    starts = [i for i, t in enumerate(ids) if t == tok.media_start_id]
    assert len(starts) == 2
    for s, n in zip(starts, (12, 48)):
        j = s + 1 + len(tok.encode("image"))
        assert tok.decode(ids[s + 1:j]) == "image" and ids[j] == tok.media_content_id
        assert ids[j + 1:j + 1 + n] == [pad] * n and ids[j + 1 + n] == tok.media_end_id
    assert tok.decode(ids).startswith("<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>")
    assert tok.decode(ids).endswith("What is this?<|im_end|><|im_assistant|>assistant<|im_middle|>")


def test_image_rows_replace_the_pads(model: ReferenceModel, images):
    from kimivl_edge.reference import text as text_ref

    p = model.prepare(build_messages("What is this?", images[:1]))
    emb = model.image_embeds(p.pixel_values, p.grid_hws)
    assert emb.shape == (12, model.config.text.hidden_size)
    x = text_ref.embed(model.weights, model.config.text, torch.tensor(p.input_ids), emb,
                       model.config.media_placeholder_token_id)
    rows = [i for i, t in enumerate(p.input_ids) if t == model.config.media_placeholder_token_id]
    torch.testing.assert_close(x[rows], emb)
    table = model.weights["language_model.model.embed_tokens.weight"]
    torch.testing.assert_close(x[0], table[p.input_ids[0]])


def test_the_image_changes_the_logits_and_generation_runs(model: ReferenceModel, images):
    a = model.logits(model.prepare(build_messages("Describe.", images[:1])))
    b = model.logits(model.prepare(build_messages("Describe.", images[1:])))
    assert a.shape[-1] == model.config.text.vocab_size and torch.isfinite(a).all()
    assert not torch.allclose(a[-1], b[-1])
    ids = model.generate_ids(model.prepare(build_messages("Describe.", images[:1])), max_new_tokens=4)
    assert 1 <= len(ids) <= 4 and ids[0] == int(a[-1].argmax())


def test_mismatched_media_placeholder_is_refused(ckpt: Path, tmp_path: Path):
    import shutil

    d = tmp_path / "ck"
    shutil.copytree(ckpt, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["media_placeholder_token_id"] += 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="media_placeholder_token_id"):
        ReferenceModel(d)


def test_reference_cli_one_line_errors(tmp_path: Path, ckpt: Path, cli):
    def run(*args):
        return cli("reference", *args)

    r = run(str(tmp_path), "--prompt", "hi")
    assert r.returncode == 2 and "missing" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run(str(ckpt), "--prompt", "hi", "--image", str(tmp_path / "nope.png"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = run(str(ckpt), "--prompt", "hi", "--max-tokens", "2")
    assert r.returncode == 0, r.stderr
