"""Attribute leakage after a video question: what the metric counts, and the diagnostic's five chats."""

from g4v_jax.eval.qa import QAItem
from g4v_jax.world.evaluation import attribute_leakage, leakage_summary
from g4v_jax.world.leakage import VARIANTS, chats

WANTED = "a big red triangle spins on a gray background"
VIDEO = "a small blue circle grows on a black background"


def test_a_value_of_the_video_in_place_of_a_requested_one_is_a_leak():
    right = attribute_leakage(WANTED, VIDEO, f"Sure, here it is: <video>{WANTED}</video>")
    assert right == {"parsed": True, "kept": 1.0, "leaked": []}
    blue = attribute_leakage(WANTED, VIDEO, "<video>a big blue triangle spins on a black background</video>")
    assert blue["leaked"] == ["background:black", "colour:blue"] and blue["kept"] == 0.6
    # a wrong value the video does not have is a miss, not a leak
    green = attribute_leakage(WANTED, VIDEO, "<video>a big green triangle spins on a gray background</video>")
    assert green["leaked"] == [] and green["kept"] == 0.8
    # a value both the request and the video name is kept, never leaked
    shared = attribute_leakage("a small red circle grows on a gray background", VIDEO,
                               "<video>a small red circle grows on a gray background</video>")
    assert shared == {"parsed": True, "kept": 1.0, "leaked": []}
    unparsed = attribute_leakage(WANTED, VIDEO, "I cannot")
    assert unparsed == {"parsed": False, "kept": 0.0, "leaked": []}
    summary = leakage_summary([right, blue, green, unparsed])
    assert summary["leak_rate"] == 1 / 3 and summary["parsed"] == 3 and summary["n"] == 4
    assert summary["leaked_by_kind"] == {"background": 1, "colour": 1}
    assert abs(summary["requested_kept"] - (1.0 + 0.6 + 0.8 + 0.0) / 4) < 1e-12


def test_the_diagnostic_chats_show_the_attributes_they_are_judged_against():
    items = [QAItem("q0", "/v/a.mp4", "What colour is the circle?", "blue"),
             QAItem("q1", "/v/b.mp4", "What shape is it?", "square")]
    captions = {"/v/a.mp4": VIDEO, "/v/b.mp4": "a small white square moves up on a brown background"}
    rows = [{"id": "g0", "request": "Show me a big red triangle spinning.", "caption": WANTED}]
    out = chats(rows, items, captions)
    assert list(out) == list(VARIANTS)
    (alone, shown), = out["request alone"]
    assert alone["turns"] == [{"from": "human", "value": rows[0]["request"]}] and shown == VIDEO
    (swapped, shown), = out["other video, exchange, request"]
    assert swapped["videos"] == ["/v/b.mp4"] and shown == captions["/v/b.mp4"]
    assert swapped["turns"][1:3] == [{"from": "human", "value": "What colour is the circle?"},
                                     {"from": "ai", "value": "blue"}]
    (text, shown), = out["exchange in text, request"]
    assert text["turns"][0] == {"from": "human", "value": f"<video>{VIDEO}</video>"} and "videos" not in text
