"""The trained tiny model: task generator and checker, training forward = reference, learning, the shipped asset.

Expected values come from hand-made scenes, from pixel counts of the rendered images, and from the independent fp32
reference model (kimivl_edge.reference.model.ReferenceModel), never from the code under test itself.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kimivl_edge.checkpoint import Checkpoint  # noqa: E402
from kimivl_edge.reference.model import Prepared, ReferenceModel  # noqa: E402
from training import tasks  # noqa: E402
from training.evaluate import answer_all, score  # noqa: E402
from training.train import (MIN_COVER, Encoder, answer_loss, cell_centres, cell_labels, collate,  # noqa: E402
                            focus_loss, forward_logits, init_dir, is_trainable, load_weights, setup_torch)

ASSET = Path(__file__).resolve().parents[1] / "kimivl_edge" / "assets" / "kimi-vl-tiny"
ASSET_SEED = 2024  # neither the training stream nor the evaluate.py default seed


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    setup_torch(1)
    yield
    torch.set_num_threads(n)
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    return init_dir(0, tmp_path_factory.mktemp("init"))


# -------------------------------------------------------------------------------------------------------------
# Task generator and checker


def _colours_in(img) -> set[tuple[int, int, int]]:
    a = np.asarray(img).reshape(-1, 3)
    return {tuple(int(v) for v in c) for c in np.unique(a, axis=0)}


def test_generator_is_deterministic():
    a, b = tasks.question_set(7, 12), tasks.question_set(7, 12)
    assert [(q.task, q.text, q.answer) for q in a] == [(q.task, q.text, q.answer) for q in b]
    for qa, qb in zip(a, b):
        for sa, sb in zip(qa.scenes, qb.scenes):
            assert np.array_equal(np.asarray(sa.render()), np.asarray(sb.render()))
    assert [q.text for q in tasks.question_set(8, 12)] != [q.text for q in a]


def test_answers_agree_with_pixels():
    """Count = number of distinct shape colours in the image; side = where that colour's pixels are; colour and
    shape questions name a colour that is present; sizes are non-square within the range."""
    palette = {v: k for k, v in tasks.COLOURS.items()}
    sizes = set()
    for q in tasks.question_set(3, 60):
        imgs = [s.render() for s in q.scenes]
        sizes |= {im.size for im in imgs}
        present = [{palette[c] for c in _colours_in(im) if c in palette} for im in imgs]
        if q.task == "count":
            assert str(len(present[0])) == q.answer
        elif q.task == "compare":
            assert q.answer == ("first" if len(present[0]) > len(present[1]) else "second")
        elif q.task == "colour":
            assert q.answer in present[0]
        elif q.task in ("shape", "side", "point"):
            colour = q.text.split(" the ")[1].split()[0]
            assert colour in present[0]
            if q.task == "side":
                a = np.asarray(imgs[0])
                xs = np.nonzero(np.all(a == tasks.COLOURS[colour], axis=-1))[1]
                w = imgs[0].width
                # the centre is in the outer 40 %; the pixels' mean is within a pixel of it (rasterisation)
                assert (xs.mean() < 0.4 * w + 1) if q.answer == "left" else (xs.mean() > 0.6 * w - 1)
    lo, hi = tasks.SIZE_RANGE
    assert all(lo <= w <= hi and lo <= h <= hi for w, h in sizes)
    assert any(w != h for w, h in sizes) and any(w % 28 for w, _ in sizes)


def test_checker_on_hand_made_scenes():
    circle = tasks.Shape("circle", "red", 50, 60, 20)
    sc = tasks.Scene(120, 130, (255, 255, 255), [circle])
    px = np.asarray(sc.render())
    assert tuple(px[60, 50]) == (220, 30, 30) and tuple(px[60, 75]) == (255, 255, 255)
    q = tasks.Question("point", [sc], "Where is the red circle? Answer with a point (x, y).", "(50, 60)", circle)
    assert tasks.is_correct(q, "(50, 60)")
    assert tasks.is_correct(q, " ( 62 ,48 ) ")  # 12² + 12² < 20²: inside
    assert not tasks.is_correct(q, "(75, 60)")  # 25 px right of the centre: outside
    assert not tasks.is_correct(q, "(50, 200)")  # outside the image
    assert not tasks.is_correct(q, "50, 60") and not tasks.is_correct(q, "red")
    c = tasks.Question("colour", [sc], "What colour is the circle?", "red")
    assert tasks.is_correct(c, "red") and tasks.is_correct(c, " Red") and not tasks.is_correct(c, "reddish")
    assert tasks.parse_point("(3, 4)") == (3, 4) and tasks.parse_point("(3 4)") is None
    star = tasks.Shape("star", "blue", 40, 40, tasks.RADIUS_RANGE[0])  # smallest star: rounded centre inside
    assert tasks.is_correct(tasks.Question("point", [tasks.Scene(80, 80, (255, 255, 255), [star])], "", "",
                                           star), "(43, 43)")


def test_cell_labels_agree_with_pixels():
    """The auxiliary head's targets, recomputed from the rendered image: each 28x28 cell of the zero-padded image is
    labelled with the colour (and that shape's kind) filling the largest share of it, if at least MIN_COVER."""
    palette = {v: k for k, v in tasks.COLOURS.items()}
    names = list(tasks.COLOURS)
    for seed in range(6):
        sc = tasks.shape_scene(np.random.default_rng(seed), 1 + seed % 3)
        cells, where = cell_labels(sc)
        a = np.zeros((-(-sc.height // 28) * 28, -(-sc.width // 28) * 28, 3), np.uint8)
        a[:sc.height, :sc.width] = np.asarray(sc.render())
        gh, gw = a.shape[0] // 28, a.shape[1] // 28
        assert cells.shape == (gh * gw, 3) and where.shape == (gh * gw, 2)
        kind_of = {s.colour: s.kind for s in sc.shapes}
        for i in range(gh):
            for j in range(gw):
                block = a[28 * i:28 * i + 28, 28 * j:28 * j + 28].reshape(-1, 3)
                share = {palette[c]: np.all(block == c, axis=1).mean() for c in palette}
                best = max(share, key=share.get)
                kind, colour, inside = cells[i * gw + j]
                if share[best] > MIN_COVER + 0.02:
                    assert names[colour - 1] == best and tasks.KINDS[kind - 1] == kind_of[best]
                elif share[best] < MIN_COVER - 0.02:
                    assert kind == 0 and colour == 0
                x, y = where[i * gw + j]
                assert abs(x * sc.width - (28 * j + 14)) < 1e-3 and abs(y * sc.height - (28 * i + 14)) < 1e-3
                assert inside == (28 * j + 14 < sc.width and 28 * i + 14 < sc.height)


def test_point_training_chats_point_into_the_named_shape():
    """With "point" trained, every point answer of the training chats (one- and multi-shape scenes) lands on a pixel
    of the named colour in the rendered image; without it, no chat asks for a point."""
    rng = np.random.default_rng(11)
    multi = 0
    for k in range(80):
        scenes, turns = tasks.make_conversation(rng, warmup=k < 20, tasks=tasks.TASKS)
        img = np.asarray(scenes[0].render())
        for q, a in turns:
            if q.startswith("Where is the"):
                colour = q.split()[3]
                x, y = tasks.parse_point(a)
                assert tuple(img[y, x]) == tasks.COLOURS[colour], (q, a)
                multi += len(scenes[0].shapes) > 1
    assert multi > 10
    rng = np.random.default_rng(11)
    without = tuple(t for t in tasks.TASKS if t != "point")
    assert not any(q.startswith("Where") for k in range(80)
                   for q, _ in tasks.make_conversation(rng, warmup=k < 20, tasks=without)[1])


def test_cell_centres_name_the_covering_shape():
    """The point task's auxiliary target: on a cell whose largest colour share is a shape's, the centre of that shape
    (found by its colour in the rendered image); 0 on background cells."""
    for seed in range(4):
        sc = tasks.shape_scene(np.random.default_rng(seed), 2 + seed % 2)
        by_colour = {s.colour: (s.cx / 100, s.cy / 100) for s in sc.shapes}
        a = np.zeros((-(-sc.height // 28) * 28, -(-sc.width // 28) * 28, 3), np.uint8)
        a[:sc.height, :sc.width] = np.asarray(sc.render())
        gw = a.shape[1] // 28
        got = cell_centres(sc)
        for i in range(a.shape[0] // 28):
            for j in range(gw):
                block = a[28 * i:28 * i + 28, 28 * j:28 * j + 28].reshape(-1, 3)
                share = {k: np.all(block == c, axis=1).mean() for k, c in tasks.COLOURS.items()}
                best = max(share, key=share.get)
                if share[best] > MIN_COVER + 0.02:
                    assert np.allclose(got[i * gw + j], by_colour[best])
                elif share[best] < MIN_COVER - 0.02:
                    assert np.all(got[i * gw + j] == 0)


# -------------------------------------------------------------------------------------------------------------
# Training forward and learning


def _examples(init, n: int, seed: int):
    enc = Encoder(init)
    rng = np.random.default_rng(seed)
    return enc, [enc.encode(*tasks.make_conversation(rng)) for _ in range(n)]


def test_chat_encoding_matches_template(init):
    """The incremental encoding equals tokenizing the whole rendered chat, answers marked where they are."""
    from kimivl_edge.prompt import render

    enc, _ = _examples(init, 0, 0)
    scenes = [tasks.shape_scene(np.random.default_rng(1), 2)]
    turns = [("How many shapes are there?", "2"), ("What colour is the star?", "green")]
    ex = enc.encode(scenes, turns)
    msgs = [{"role": "user", "content": [{"type": "image", "image": scenes[0].render()},
                                         {"type": "text", "text": turns[0][0]}]},
            {"role": "assistant", "content": "2"}, {"role": "user", "content": turns[1][0]},
            {"role": "assistant", "content": "green"}]
    text = render(enc.template, msgs, add_generation_prompt=False)
    pad = enc.tokenizer.media_pad_id
    full = enc.tokenizer.encode(text)
    assert [t for t in ex.ids if t != pad] == [t for t in full if t != pad]
    marked = enc.tokenizer.decode([t for t, m in zip(ex.ids, ex.answer) if m])
    assert marked == "2<|im_end|>green<|im_end|>"


def test_focus_marks_the_named_shapes_tokens(init):
    """The attention supervision of a chat: the positions that predict an answer's tokens (not its <|im_end|>) of a
    question naming a shape, and as keys the image tokens whose 28-pixel cell shows mostly that shape's colour
    (counted in the rendered image); a question naming no shape is not supervised."""
    enc, _ = _examples(init, 0, 0)
    sc = tasks.shape_scene(np.random.default_rng(4), 3)
    named = sc.shapes[1]
    turns = [("How many shapes are there?", "3"), (f"What colour is the {named.kind}?", named.colour),
             tasks.point_turn(named)]
    ex = enc.encode([sc], turns)
    img = np.asarray(sc.render())
    h, w = img.shape[:2]
    gh, gw = -(-h // 28), -(-w // 28)
    share = np.zeros((len(sc.shapes), gh * 28, gw * 28))
    for k, s in enumerate(sc.shapes):
        share[k, :h, :w] = (img == tasks.COLOURS[s.colour]).all(-1)
    share = share.reshape(len(sc.shapes), gh, 28, gw, 28).mean((2, 4)).reshape(len(sc.shapes), -1)
    k = 1
    mine = (share[k] >= MIN_COVER) & (share[k] == share.max(0))
    pads = [i for i, t in enumerate(ex.ids) if t == enc.tokenizer.media_pad_id]
    want_keys = [pads[j] for j in np.flatnonzero(mine)]
    assert want_keys
    rows = [t for t, _, _ in ex.focus]
    assert all(list(keys) == want_keys for _, keys, _ in ex.focus)
    named_by = [tuple(enc.tokenizer.decode([ex.ids[i]]).strip() for i in words) for _, _, words in ex.focus]
    assert list(dict.fromkeys(named_by)) == [(named.kind,), (named.colour, named.kind)]  # "the star", "the red star"
    predicted = enc.tokenizer.decode([ex.ids[t + 1] for t in rows])
    assert predicted == named.colour + tasks.point_text(named)  # the answers of turns 2 and 3, not the count's


def test_focus_loss_is_minus_log_attention_mass():
    """focus_loss against the attention weights written out: softmax of q·k·scale over the causal keys."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    rows = torch.zeros(2, 5, dtype=torch.bool)
    keys = torch.zeros(2, 5, 5, dtype=torch.bool)
    rows[0, 3], keys[0, 3, [0, 2]] = True, True
    rows[1, 4], keys[1, 4, [1]] = True, True
    want = []
    for b, t, ks in ((0, 3, [0, 2]), (1, 4, [1])):
        s = [float(q[b, t] @ k[b, j]) * 0.5 for j in range(t + 1)]
        p = np.exp(s) / np.exp(s).sum()
        want.append(-np.log(p[ks].sum()))
    assert float(focus_loss(q, k, 0.5, rows, keys)) == pytest.approx(np.mean(want), rel=1e-5)


def test_training_forward_equals_reference(init):
    enc, exs = _examples(init, 3, 11)
    w = load_weights(init)
    batch = collate(exs, enc.tokenizer.id_of("[PAD]"))
    assert len({len(e.ids) for e in exs}) > 1  # padding is exercised
    with torch.no_grad():
        got = forward_logits(w, Checkpoint(init).config, batch)
    ref = ReferenceModel(init)
    for b, e in enumerate(exs):
        want = ref.logits(Prepared(e.ids, e.pixel_values, np.asarray(e.grids)))
        torch.testing.assert_close(got[b, :len(e.ids)], want, atol=1e-4, rtol=1e-4)


def test_a_few_steps_reduce_the_loss(init):
    enc, exs = _examples(init, 2, 5)
    cfg = Checkpoint(init).config
    w = load_weights(init)
    params = [t.requires_grad_() for n, t in w.items() if is_trainable(n)]
    opt = torch.optim.AdamW(params, lr=2e-3)
    batch = collate(exs, enc.tokenizer.id_of("[PAD]"))
    losses = []
    for _ in range(6):
        loss = answer_loss(w, cfg, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


# -------------------------------------------------------------------------------------------------------------
# The shipped asset


def test_asset_is_a_valid_bf16_checkpoint():
    ck = Checkpoint(ASSET)
    assert ck.config.raw == Checkpoint(ASSET).config.raw
    assert {ck.dtype(n) for n in ck.names} == {"BF16"}
    size = sum(f.stat().st_size for f in ASSET.glob("*.safetensors"))
    assert 2e6 < size < 20e6


def test_asset_sees():
    """Held-out questions of every trained task (36, a seed neither training nor evaluate.py uses): the reference
    answers most of them (600-question figures in the README), and far fewer once the images are blank (the answer
    comes through the vision path; chance is about 30 %)."""
    model = ReferenceModel(ASSET)
    qs = tasks.question_set(ASSET_SEED, 36, tasks.TASKS)
    seeing = score(qs, answer_all(model, qs))["all"]
    blind = score(qs, answer_all(model, qs, blind=True))["all"]
    assert seeing >= 0.8, seeing
    assert blind <= 0.5, blind
    assert seeing - blind >= 0.4, (seeing, blind)


def test_asset_points_at_the_named_shape():
    """Grounding: point questions about 1-3-shape scenes (a seed neither training nor evaluate.py uses); an answer is
    right when its pixel lies inside the named shape as rendered (tasks.is_correct). 97 % on 100 held-out in the
    README; with blank images the points land on the shape about as often as its area share (~5 %)."""
    model = ReferenceModel(ASSET)
    qs = tasks.question_set(ASSET_SEED + 1, 24, ("point",))
    assert sum(len(q.scenes[0].shapes) > 1 for q in qs) >= 12  # mostly the look-up of one of several shapes
    seeing = score(qs, answer_all(model, qs))["point"]
    blind = score(qs, answer_all(model, qs, blind=True))["point"]
    assert seeing >= 0.75, seeing
    assert blind <= 0.25, blind
