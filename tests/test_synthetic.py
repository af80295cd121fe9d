"""The synthetic dataset: deterministic random access and ground truth that matches the rendered pixels.

References are computed from the frames alone: with noise 0 and a flat background every object is
painted in its exact RGB colour, so the pixels of a colour are the visible pixels of that object.
"""

import dataclasses

import numpy as np
import pytest

from tpo_jax.data import synthetic as S
from tpo_jax.data.rle import rle_decode
from tpo_jax.data.synthetic_render import COLOURS, bounce, shape_mask
from tpo_jax.config import ConfigError

CLEAN = S.SyntheticConfig(noise=0.0, num_objects=(2, 3), size=40, num_frames=6, fps=2.0).validate()


def colour_pixels(frames, colour):
    return np.all(frames == np.asarray(COLOURS[colour], np.uint8), axis=-1)


def extent(mask, h, w):
    rows, cols = np.nonzero(mask)
    return np.array([cols.min() / w, rows.min() / h, (cols.max() + 1) / w, (rows.max() + 1) / h], np.float32)


def target_colour(record):
    text = record.question or ""
    return next(c for c in COLOURS if f"the {c} " in text)


def test_records_are_deterministic_and_distinct():
    for task in S.TASKS:
        a, b = S.make_record(S.SyntheticConfig(), task, 5, seed=3), S.make_record(S.SyntheticConfig(), task, 5, seed=3)
        np.testing.assert_array_equal(a.frames, b.frames)
        assert (a.question, a.turns, a.options, a.mc_answer) == (b.question, b.turns, b.options, b.mc_answer)
        c = S.make_record(S.SyntheticConfig(), task, 6, seed=3)
        d = S.make_record(S.SyntheticConfig(), task, 5, seed=3, split="validation")
        assert not np.array_equal(a.frames, c.frames) or a.frames.shape != c.frames.shape
        assert not np.array_equal(a.frames, d.frames) or a.frames.shape != d.frames.shape
        assert a.frames.dtype == np.uint8 and a.frames.shape[1:] == (32, 32, 3)
        a.validate()


def test_region_box_is_the_pixel_extent_of_the_described_object():
    checked = {"image": 0, "video": 0}
    for i in range(12):
        r = S.make_record(CLEAN, "region", i)
        pixels = colour_pixels(r.frames[0], target_colour(r))
        np.testing.assert_allclose(r.boxes[0], extent(pixels, 40, 40), atol=1e-7)
        assert ("first frame" in r.question) == (len(r.frames) > 1)
        checked["image" if len(r.frames) == 1 else "video"] += 1
    assert min(checked.values()) > 0


def test_temporal_span_and_saliency_match_the_visible_frames():
    for i in range(12):
        r = S.make_record(CLEAN, "temporal", i)
        seen = colour_pixels(r.frames, target_colour(r)).any(axis=(1, 2))
        frames = np.flatnonzero(seen)
        assert np.all(np.diff(frames) == 1)  # one contiguous run (the target is never occluded)
        np.testing.assert_allclose(r.spans, [[frames[0] / 2.0, (frames[-1] + 1) / 2.0]])
        np.testing.assert_array_equal(r.saliency, np.where(seen, 12.0, 0.0))  # the 0-12 scale
        assert r.duration == 3.0 and r.clip_seconds == 0.5


def test_tracking_boxes_masks_and_visibility_match_the_pixels():
    for i in range(8):
        r = S.make_record(CLEAN, "mask", i)
        pixels = colour_pixels(r.frames, target_colour(r) if r.question else _tracked_colour(r))
        np.testing.assert_array_equal(r.track_visible, pixels.any(axis=(1, 2)))
        assert r.track_visible[0]
        for t in range(len(r.frames)):
            np.testing.assert_array_equal(rle_decode(r.track_masks[t]).astype(bool), pixels[t])
            if r.track_visible[t]:
                np.testing.assert_allclose(r.track_boxes[t], extent(pixels[t], 40, 40), atol=1e-7)


def _tracked_colour(r):
    """The colour whose frame-0 pixels fill the first track box (tracking records name no object)."""
    x0, y0, x1, y1 = np.rint(r.track_boxes[0] * 40).astype(int)
    patch = r.frames[0, y0:y1, x0:x1].reshape(-1, 3)
    return next(c for c in COLOURS if np.any(np.all(patch == COLOURS[c], axis=-1))
                and np.array_equal(extent(colour_pixels(r.frames[0], c), 40, 40), r.track_boxes[0]))


def test_conversation_facts_match_the_pixels():
    kinds = set()
    for i in range(30):
        scene = S.make_scene(CLEAN, S.record_rng(0, "train", "conversation", i))
        colours = [c for c in COLOURS if colour_pixels(scene.frames, c).any()]
        firsts = {c: int(np.flatnonzero(colour_pixels(scene.frames, c).any(axis=(1, 2)))[0]) for c in colours}
        rng = np.random.default_rng(i)
        for kind in S.CONVERSATION_KINDS:
            q = S.scene_question(CLEAN, scene, rng, kind)
            if q is None:
                continue
            question, answer, options, idx = q
            assert options[idx] == answer and len(set(options)) == len(options)
            assert S.question_kind(question) == kind
            kinds.add(kind)
            if kind == "count":
                assert answer == S.NUMBER_WORDS[len(colours)].capitalize() + "."
            elif kind == "order":
                a, b = [c for c in COLOURS if f"the {c} " in question.split(",")[1]]
                order = sorted([a, b], key=lambda c: question.index(c))
                early = min(order, key=lambda c: firsts[c])
                assert firsts[order[0]] != firsts[order[1]] and answer.startswith(f"The {early} ")
            elif kind == "presence":
                named = [c for c in COLOURS if f"a {c} " in question][0]
                shape = question.split(named)[1].split()[0]
                present = any(o.colour == named and o.shape == shape for o in scene.objects
                              if colour_pixels(scene.frames, o.colour).any())
                assert answer == ("Yes." if present else "No.")
    assert kinds == set(S.CONVERSATION_KINDS)
    with pytest.raises(ValueError, match="none of the synthetic kinds"):
        S.question_kind("What size is the square?")


def test_shapes_and_motion():
    sq = shape_mask("square", 10.0, 10.0, 6.0, 20, 20)
    assert sq.sum() == 36 and sq[7:13, 7:13].all()
    circle = shape_mask("circle", 10.0, 10.0, 10.0, 20, 20)
    assert abs(circle.sum() - np.pi * 25) < 6
    tri = shape_mask("triangle", 10.0, 10.0, 10.0, 20, 20)
    widths = tri.sum(axis=1)[tri.any(axis=1)]
    assert np.all(np.diff(widths) >= 0) and widths[-1] > 4 * widths[0]  # widening towards the base
    p = bounce(2.0, 3.0, 1.0, 9.0, 8)  # 2, 5, 8, reflected at 9: 7, 4, 1, reflected at 1: 4, 7
    np.testing.assert_allclose(p, [2, 5, 8, 7, 4, 1, 4, 7])


def test_hard_preset_and_source():
    cfg = S.get_synthetic_config("hard")
    src = S.SyntheticSource(cfg, "temporal", "validation", seed=1)
    assert len(src) == cfg.eval_size
    r = src[3]
    assert r.frames.shape == (8, 64, 64, 3) and r.id == "synthetic-validation-temporal-3"
    with pytest.raises(IndexError):
        src[len(src)]


@pytest.mark.parametrize("field, value", [("num_objects", (3, 2)), ("colours", ("red", "mauve")),
                                          ("min_side", 0.01), ("image_prob", 1.5)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"synthetic.{field}"):
        dataclasses.replace(S.SyntheticConfig(), **{field: value}).validate()
