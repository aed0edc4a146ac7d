"""The seen/held-out pair diagnostic: which questions it asks, and how it counts a wrong answer."""

import json

from g4v_jax.world.pairs import BINDING, Item, held_out_items, judge, items_of, seen_pair_items, summarise
from g4v_jax.world.scene import HELD_OUT_PAIRS, parse_caption

TWO = parse_caption("a big blue circle grows and a small red square spins on a gray background")
ONE = parse_caption("a small yellow triangle moves up on a black background")


def test_a_wrong_answer_is_another_objects_value_or_in_no_object():
    shape = Item("/v.mp4", "What shape is the blue object?", "circle", "shape", TWO)
    assert judge(shape, "circle") == "right"
    assert judge(shape, "square") == BINDING  # the red object's shape
    assert judge(shape, "triangle") == "in no object"
    colour = Item("/v.mp4", "What colour is the square?", "red", "colour", TWO)
    assert judge(colour, "blue") == BINDING and judge(colour, "green") == "in no object"
    lone = Item("/w.mp4", "What shape is the yellow object?", "triangle", "shape", ONE)
    s = summarise([shape, shape, colour, lone], ["circle", "square", "green", "circle"])
    assert s["shape"]["several objects"] == {"n": 2, "exact_match": 0.5, BINDING: 0.5, "in no object": 0.0}
    assert s["shape"]["one object"] == {"n": 1, "exact_match": 0.0, BINDING: 0.0, "in no object": 1.0}
    assert s["colour"]["several objects"]["in no object"] == 1.0


def test_held_out_questions_are_about_held_out_objects_only():
    qs = items_of("/v.mp4", TWO, only_held_out=True)
    assert {(i.question, i.answer) for i in qs} == {("What colour is the circle?", "blue"),
                                                    ("What shape is the blue object?", "circle")}
    every = items_of("/v.mp4", TWO, only_held_out=False)
    assert len(every) == 4 and {i.kind for i in every} == {"colour", "shape"}


def test_new_videos_show_seen_pairs_only_and_the_same_seed_writes_the_same_files(tmp_path):
    a = seen_pair_items(tmp_path / "a", 6, seed=3, num_frames=2, size=32)
    b = seen_pair_items(tmp_path / "b", 6, seed=3, num_frames=2, size=32)
    assert a and all(not (it.scene.pairs & HELD_OUT_PAIRS) for it in a)
    assert [(i.question, i.answer) for i in a] == [(i.question, i.answer) for i in b]
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes()
               for n in sorted(p.name for p in (tmp_path / "a").iterdir()))


def test_the_splits_questions_are_read_with_their_videos_scene(tmp_path):
    (tmp_path / "catalogue.jsonl").write_text(json.dumps(
        {"video": "videos/test-00000.mp4", "caption": "a big blue circle grows and a small red square spins on a "
                                                      "gray background"}) + "\n")
    rows = [{"id": "q0", "video": "videos/test-00000.mp4", "question": "What shape is the blue object?",
             "answer": "circle"},
            {"id": "q1", "video": "videos/test-00000.mp4", "question": "What is the background colour?",
             "answer": "gray"}]
    (tmp_path / "test_qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (it,) = held_out_items(tmp_path / "test_qa.jsonl", tmp_path / "catalogue.jsonl")
    assert it.kind == "shape" and it.scene.pairs == TWO.pairs
    assert it.video == str((tmp_path / "videos/test-00000.mp4").resolve())
