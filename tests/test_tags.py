"""Tests for g4v_jax.tags: every policy rule of the module docstring, offsets, strip_video_tags, and the stream parser
agreeing with parse_video_tags for any chunking (exhaustive 2-way splits, random k-way splits, random texts checked
against an independent reference parser written here)."""

from __future__ import annotations

import random
import re

import pytest

from g4v_jax.tags import TagStreamParser, VideoRequest, parse_video_tags, strip_video_tags


def req(prompt, index, start, end, closed=True):
    return VideoRequest(prompt=prompt, index=index, start=start, end=end, closed=closed)


def prompts(text, **kw):
    return [(r.prompt, r.index) for r in parse_video_tags(text, **kw)]


def stream(chunks, *, accept_unclosed=False):
    parser = TagStreamParser(accept_unclosed=accept_unclosed)
    out = []
    for chunk in chunks:
        out.extend(parser.feed(chunk))
    return out + parser.finish()


# --------------------------------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------------------------------


def test_single_tag_with_offsets():
    text = "Sure! <video>a cat sleeping on a sofa</video> Enjoy."
    [r] = parse_video_tags(text)
    assert r == req("a cat sleeping on a sofa", None, 6, 45)
    assert text[r.start : r.end] == "<video>a cat sleeping on a sofa</video>"


def test_several_and_numbered_tags():
    text = "First <video1>a red car</video1>, then <video2>a blue boat</video2>. And <video>x</video>"
    assert prompts(text) == [("a red car", 1), ("a blue boat", 2), ("x", None)]
    assert [text[r.start : r.end] for r in parse_video_tags(text)] == [
        "<video1>a red car</video1>", "<video2>a blue boat</video2>", "<video>x</video>"]
    assert prompts("<video12>a</video12><video99>b</video99>") == [("a", 12), ("b", 99)]


def test_unnumbered_close_of_numbered_open_is_accepted_with_the_number():
    assert parse_video_tags("<video2>a dog</video>") == [req("a dog", 2, 0, 21)]
    assert prompts("<video>a dog</video3>") == [("a dog", 3)]  # the symmetric leniency


def test_different_numbers_do_not_match_and_drop_the_span():
    assert parse_video_tags("<video1>a cat</video2> and more text") == []
    assert parse_video_tags("<video1>a cat</video2> and more", accept_unclosed=True) == []  # consumed, not open
    # the mismatched close ends the span, so the next one parses normally
    assert prompts("<video1>a cat</video2> <video2>a dog</video2>") == [("a dog", 2)]


def test_nested_opening_restarts_the_span():
    text = "<video>a <video>b</video>"
    assert parse_video_tags(text) == [req("b", None, 9, 25)]
    assert prompts("<video1>a <video2>b</video2> <video3>c</video3>") == [("b", 2), ("c", 3)]
    assert prompts("<video1>a <video2>b</video>") == [("b", 2)]
    assert prompts("<video><video><video>deep</video></video>") == [("deep", None)]  # the extra close is stray


def test_unclosed_dropped_by_default_accepted_on_request():
    text = "Here: <video>a cat\n  on a mat"
    assert parse_video_tags(text) == []
    assert parse_video_tags(text, accept_unclosed=True) == [req("a cat on a mat", None, 6, len(text), closed=False)]
    # only the last open span can be unclosed; the restarted outer one is dropped either way
    assert prompts("<video1>a <video2>b", accept_unclosed=True) == [("b", 2)]
    # closed requests before it are unaffected by the policy
    assert prompts("<video>a</video> <video3>b", accept_unclosed=True) == [("a", None), ("b", 3)]
    assert prompts("<video>a</video> <video3>b") == [("a", None)]
    # a partial closing tag at the end is just text of the unclosed prompt
    assert prompts("<video>a cat</vid", accept_unclosed=True) == [("a cat</vid", None)]
    assert parse_video_tags("<video>   \n", accept_unclosed=True) == []  # empty even if accepted


def test_empty_prompts_dropped():
    assert parse_video_tags("<video></video>") == []
    assert parse_video_tags("<video> \n\t </video>") == []
    assert prompts("<video1></video1><video2>x</video2>") == [("x", 2)]


def test_stray_closing_tags_ignored():
    assert parse_video_tags("</video> nothing here </video2>") == []
    text = "</video><video>a</video></video1>"
    assert parse_video_tags(text) == [req("a", None, 8, 24)]


def test_case_and_spaces_inside_brackets():
    for text, index in [("<VIDEO>a</VIDEO>", None), ("< Video >a</ video >", None), ("<video 3>a</video3>", 3),
                        ("< / VIDEO3 >x<VIDEO3 >a< /video\t3>", 3), ("<\tvideo\t>a<\t/\tvideo\t>", None)]:
        assert prompts(text) == [("a", index)], text


@pytest.mark.parametrize("not_a_tag", ["<video0>", "<video01>", "<video100>", "<videos>", "<video\n>", "<vide o>",
                                       "<video-1>", "<video1a>", "<<video", "video>", "< video"])
def test_things_that_are_not_tags(not_a_tag):
    assert parse_video_tags(f"{not_a_tag}a cat</video>") == []
    # inside a span they are plain caption text
    assert prompts(f"<video>x {not_a_tag} y</video>") == [(f"x {not_a_tag} y".replace("\n", " ").replace("  ", " "),
                                                           None)]


def test_whitespace_normalised_and_long_prompts_kept():
    assert prompts("<video>\n  a cat \t runs\n\n fast  </video>") == [("a cat runs fast", None)]
    long = " ".join(["word"] * 2000)
    assert prompts(f"<video>{long}</video>") == [(long, None)]


def test_never_raises_on_odd_text():
    for text in ["", "<", ">", "</", "<video", "</video", "<>", "<<>>", "\x00<video>\x00</video>", "é<vidéo>x</vidéo>",
                 "<video>" * 50, "</video>" * 50, "<video1>" + "a" * 10_000, "🎥<video>🐱</video>"]:
        for accept in (False, True):
            parse_video_tags(text, accept_unclosed=accept)
    assert prompts("🎥<video>🐱</video>") == [("🐱", None)]


# --------------------------------------------------------------------------------------------------------------------
# strip_video_tags
# --------------------------------------------------------------------------------------------------------------------


def test_strip_video_tags():
    text = "A <video1>cat</video1> and <video2>dog</video2>."
    assert strip_video_tags(text) == "A  and ."
    assert strip_video_tags(text, "[video]") == "A [video] and [video]."
    paths = {2: "a.mp4", 27: "b.mp4"}
    assert strip_video_tags(text, lambda r: f"[video {r.index}: {paths[r.start]}]") == (
        "A [video 1: a.mp4] and [video 2: b.mp4].")
    assert strip_video_tags("no tags") == "no tags"


def test_strip_leaves_text_that_gave_no_request():
    text = "</video> <video></video> <video1>x</video2> <video>open"
    assert strip_video_tags(text, "[V]") == text
    assert strip_video_tags(text, "[V]", accept_unclosed=True) == "</video> <video></video> <video1>x</video2> [V]"


# --------------------------------------------------------------------------------------------------------------------
# Stream parser
# --------------------------------------------------------------------------------------------------------------------

SPLIT_CASES = [
    "<video>a cat</video>",
    "Sure. < Video2 >a red\n car</ video >, and <video10>x</video10>!",
    "</video><video1>a <video2>b</video1> <video3>c</VIDEO3> <video>tail",
    "<video1>x</video2> <video 7 >y</video7> <videos> <video100> <vid <video>z",
]


@pytest.mark.parametrize("text", SPLIT_CASES)
@pytest.mark.parametrize("accept_unclosed", [False, True])
def test_stream_matches_batch_on_every_two_way_split(text, accept_unclosed):
    expected = parse_video_tags(text, accept_unclosed=accept_unclosed)
    assert expected  # the cases are meant to contain requests
    for i in range(len(text) + 1):
        assert stream([text[:i], text[i:]], accept_unclosed=accept_unclosed) == expected, i


def test_stream_char_by_char_and_three_way_splits():
    text = SPLIT_CASES[1]
    expected = parse_video_tags(text)
    assert stream(list(text)) == expected
    short = "<video2>ab</ video>"
    for i in range(len(short) + 1):
        for j in range(i, len(short) + 1):
            assert stream([short[:i], short[i:j], short[j:]]) == parse_video_tags(short), (i, j)


def test_feed_returns_requests_when_their_closing_tag_completes():
    parser = TagStreamParser(accept_unclosed=True)
    assert parser.feed("<vid") == []
    assert parser.feed("eo>a cat</vi") == []
    assert parser.feed("deo> and <video2>a d") == [req("a cat", None, 0, 20)]
    assert parser.feed("og") == []
    assert parser.feed("") == []
    assert parser.finish() == [req("a dog", 2, 25, 38, closed=False)]
    with pytest.raises(RuntimeError):
        parser.feed("more")
    with pytest.raises(RuntimeError):
        parser.finish()


def test_stream_finish_drops_unclosed_by_default():
    parser = TagStreamParser()
    assert parser.feed("<video>a cat") == []
    assert parser.finish() == []


def test_stream_keeps_only_what_it_needs():
    """Without an open span the parser holds at most a pending partial tag, however long the text."""
    parser = TagStreamParser()
    filler = "text with < and <b> and <vid but no tags. "
    for _ in range(500):
        for ch in filler:
            parser.feed(ch)
        assert len(parser._buf) < 8
    assert parser.feed("<video>a</video>") == [req("a", None, 500 * len(filler), 500 * len(filler) + 16)]


# --------------------------------------------------------------------------------------------------------------------
# Random texts: independent reference parser, offsets, random chunkings
# --------------------------------------------------------------------------------------------------------------------

FRAGMENTS = [
    "<video>", "</video>", "<video1>", "</video1>", "<video2>", "</Video2>", "< video >", "</ video>", "<VIDEO12>",
    "</video12>", "<video 3 >", "< / video3>", "<video0>", "<video100>", "<videos>", "<vid", "eo>", "<", ">", "/",
    "video", "1", " ", "  ", "\n", "\t", "a", "cat", "dog runs", "<b>", "x<y", "é", "🎥",
]


def random_text(rnd: random.Random) -> str:
    return "".join(rnd.choice(FRAGMENTS) for _ in range(rnd.randint(0, 25)))


def reference_parse(text: str, accept_unclosed: bool) -> list[VideoRequest]:
    """The policy written out a second way: collect tags first, then one pass over them."""
    tag = re.compile(r"<[ \t]*(/?)[ \t]*[vV][iI][dD][eE][oO][ \t]*([1-9][0-9]?|)[ \t]*>")
    out, opening = [], None
    for m in tag.finditer(text):
        closing, number = m.group(1) == "/", (int(m.group(2)) if m.group(2) else None)
        if not closing:
            opening = (m, number)
            continue
        if opening is None:
            continue
        (om, onum), opening = opening, None
        if onum is not None and number is not None and onum != number:
            continue
        body = " ".join(text[om.end() : m.start()].split())
        if body:
            out.append(req(body, onum if onum is not None else number, om.start(), m.end()))
    if opening is not None and accept_unclosed:
        om, onum = opening
        body = " ".join(text[om.end() :].split())
        if body:
            out.append(req(body, onum, om.start(), len(text), closed=False))
    return out


def random_chunks(text: str, rnd: random.Random) -> list[str]:
    k = rnd.randint(0, min(len(text), 12))
    cuts = sorted(rnd.randint(0, len(text)) for _ in range(k))  # repeated cuts give empty chunks, on purpose
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def test_random_texts_against_reference_and_random_chunkings():
    rnd = random.Random(0)
    nonempty = 0
    for _ in range(1500):
        text = random_text(rnd)
        for accept in (False, True):
            expected = parse_video_tags(text, accept_unclosed=accept)
            assert expected == reference_parse(text, accept), text
            nonempty += bool(expected)
            prev_end = 0
            for r in expected:  # offsets: in order, non-overlapping, the span is the tags and their body
                assert prev_end <= r.start < r.end <= len(text)
                span = text[r.start : r.end]
                assert span.startswith("<") and r.prompt and r.prompt == r.prompt.strip()
                assert span.endswith(">") if r.closed else r.end == len(text)
                prev_end = r.end
            for _ in range(3):
                chunks = random_chunks(text, rnd)
                assert "".join(chunks) == text
                assert stream(chunks, accept_unclosed=accept) == expected, (text, chunks)
    assert nonempty > 300  # the generator does produce requests, so the comparisons are not vacuous
