"""The world's data: splits, answers, safety wording and file formats of a quick build_world."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from g4v_jax.data.manifest import read_manifest
from g4v_jax.data.video import load_video
from g4v_jax.eval.qa import read_qa
from g4v_jax.eval.safety import read_cases
from g4v_jax.safety.refusal import is_refusal
from g4v_jax.tags import parse_video_tags
from g4v_jax.world import examples as world_examples
from g4v_jax.world import language
from g4v_jax.world.scene import HELD_OUT_PAIRS, caption, parse_caption, parse_noun_phrase, random_scene, same_scene
from g4v_jax.world.examples import STAGE2_TWO_VIDEO_FRACTION, STAGE2_VIDEO_FRACTION, detector_examples
from g4v_jax.world.language import (
    BACKGROUND_QUESTION,
    COUNT_QUESTION,
    COUNT_WORDS,
    DESCRIBE_INSTRUCTION,
    GENERATION_TEMPLATES,
    HARMFUL_CONTENT_TRAIN,
    HARMFUL_TEMPLATES_TRAIN,
    LOOKALIKE_TEMPLATES_TRAIN,
    REFUSALS,
    TWO_VIDEO_QUESTION,
    fill_request,
    generation_answer,
    ordinary_questions,
    parse_request,
    two_video_answer,
)
from g4v_jax.world.tasks import build_world, world_text

HELD_OUT_WORDS = re.compile("|".join(rf"\b{c} {s}\b" for c, s in HELD_OUT_PAIRS))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"), quick=True, seed=0)


def jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def texts(example):
    return [t.text for t in example.turns if t.video is None]


def tagged_scene(text):
    """The scene of the (single) <video>caption</video> span in ``text``."""
    requests = parse_video_tags(text)
    assert len(requests) == 1, text
    return parse_caption(requests[0].prompt)


def qa_pairs(example):
    """(question, answer) for each human text turn followed by an AI turn."""
    turns = example.turns
    return [(turns[k].text, turns[k + 1].text) for k in range(len(turns) - 1)
            if turns[k].role == "human" and turns[k].video is None and turns[k + 1].role == "ai"]


def catalogue(world):
    return {row["video"]: row for row in jsonl(world.catalogue)}


def test_quick_build_is_fast_and_every_file_reads_back(world):
    assert world.seconds < 30, world.seconds  # a few seconds on a 2-core machine
    assert 150 <= world.counts["videos"] <= 250
    for name in ("stage0", "stage1", "stage2"):
        assert len(read_manifest(getattr(world, name))) == world.counts[name] > 0
    assert len(read_qa(world.test_qa)) == world.counts["test_qa"]
    assert len(read_qa(world.test_count)) == world.counts["test_count"]
    for cases_file in (world.safety_cases, world.val_safety_cases):
        cases = read_cases(cases_file)
        assert {(c.task, c.label) for c in cases} == {("VU", "harmful"), ("VU", "safe"), ("VG", "harmful"),
                                                      ("VG", "safe")}
    rows = catalogue(world)
    assert len(rows) == world.counts["videos"]
    assert all((world.root / v).is_file() for v in rows)
    clip = load_video(world.root / next(iter(rows)), num_frames=4, size=32)
    assert clip.frames.shape == (4, 32, 32, 3) and clip.frame_mask.all()


def test_held_out_pairs_never_in_training_and_in_every_test_scene(world):
    # stage 0 (the LLM's pre-training text, LLaMA's stand-in) uses every pair; see stage0_examples
    assert any(HELD_OUT_WORDS.search(t) for ex in read_manifest(world.stage0) for t in texts(ex))
    for name in ("stage1", "stage2"):
        for ex in read_manifest(getattr(world, name)):
            for text in texts(ex) + list(ex.captions):
                assert not HELD_OUT_WORDS.search(text), (name, ex.id, text)
            for c in ex.captions:
                assert not parse_caption(c).pairs & HELD_OUT_PAIRS
    for row in catalogue(world).values():
        held = parse_caption(row["caption"]).pairs & HELD_OUT_PAIRS
        assert len(held) == (1 if row["split"] in ("test", "val", "safety", "val-safety") else 0), row
    for row in jsonl(world.test_generation):
        assert len(parse_caption(row["caption"]).pairs & HELD_OUT_PAIRS) == 1
    for case in read_cases(world.safety_cases) + read_cases(world.val_safety_cases):
        if case.task == "VG" and case.label == "safe":
            assert len(parse_request(case.query).pairs & HELD_OUT_PAIRS) == 1


def test_validation_split_is_held_out_and_apart_from_test(world):
    rows = catalogue(world)
    test_videos = {it.video for it in read_qa(world.test_qa)}
    val_items = read_qa(world.val_qa)
    assert val_items and len(read_qa(world.val_count)) == world.counts["val_count"] > 0
    for item in val_items + read_qa(world.val_count):
        row = rows[str(Path(item.video).relative_to(world.root))]
        assert row["split"] == "val" and item.video not in test_videos
        assert len(parse_caption(row["caption"]).pairs & HELD_OUT_PAIRS) == 1
    val_requests = [r["request"] for r in jsonl(world.val_generation)]
    assert val_requests and not set(val_requests) & {r["request"] for r in jsonl(world.test_generation)}
    assert all(len(parse_request(r).pairs & HELD_OUT_PAIRS) == 1 for r in val_requests)


def test_stage0_rewrites_noun_phrases_as_captions(world):
    rewrites = [ex for ex in read_manifest(world.stage0) if ex.turns[0].text.startswith("Write this as a caption:")]
    assert len(rewrites) >= 0.1 * world.counts["stage0"]
    for ex in rewrites:
        human, ai = ex.turns
        scene = parse_noun_phrase(human.text.removeprefix("Write this as a caption: "))
        assert ai.text == caption(scene)


def test_count_question_only_in_stage2_text(world):
    for name in ("stage0", "stage1"):
        for ex in read_manifest(getattr(world, name)):
            assert not any("how many" in t.lower() for t in texts(ex)), (name, ex.id)
    stage2 = read_manifest(world.stage2)
    counted = 0
    for ex in stage2:
        for q, a in qa_pairs(ex):
            if q == COUNT_QUESTION:  # about a caption, never a real video (examples.stage2_video_examples)
                assert not ex.videos and a == COUNT_WORDS[len(tagged_scene(ex.turns[0].text).objects) - 1]
                counted += 1
    assert counted >= 0.15 * len(stage2)
    assert {a for _, a in (pair for ex in stage2 for pair in qa_pairs(ex)) if a in COUNT_WORDS} == set(COUNT_WORDS)


def test_answers_match_the_scene_in_every_stage(world):
    def check(scene, pairs, where):
        truth = dict(ordinary_questions(scene))
        assert len(truth) == len(ordinary_questions(scene)), "a question would be ambiguous"
        for q, a in pairs:
            if q == DESCRIBE_INSTRUCTION:
                assert a == caption(scene), where
            elif a.startswith("Sure, here it is:"):  # a generation request after the video: its own test
                continue
            elif q != COUNT_QUESTION:
                assert truth[q] == a, (where, q, a)

    for ex in read_manifest(world.stage1):
        if len(ex.videos) == 2:  # test_two_video_questions_need_both_videos
            continue
        assert ex.turns[0].video == 0 and ex.turns[-2].text == DESCRIBE_INSTRUCTION  # questions before description
        check(parse_caption(ex.captions[0]), qa_pairs(ex), ex.id)
    for name in ("stage0", "stage2"):
        for ex in read_manifest(getattr(world, name)):
            if ex.id.endswith("-video_generation") and len(ex.turns) == 3:  # examples.noise_video_text, a request
                assert ex.turns[1].role == "human" and ex.turns[2].text.startswith("Sure, here it is:"), ex.id
            elif ex.turns[0].text.startswith("<video>"):
                check(tagged_scene(ex.turns[0].text), qa_pairs(ex), ex.id)
    rows = catalogue(world)
    items = read_qa(world.test_qa)
    for item in items:
        scene = parse_caption(rows[str(Path(item.video).relative_to(world.root))]["caption"])
        assert dict(ordinary_questions(scene))[item.question] == item.answer
        # Test questions are about the held-out object: its colour, its shape or (named by both) its motion.
        held = next(o for o in scene.objects if o.pair in HELD_OUT_PAIRS)
        assert (item.question == BACKGROUND_QUESTION or item.answer in held.pair
                or f"{held.colour} {held.shape}" in item.question), item
    assert sum(i.question != BACKGROUND_QUESTION for i in items) >= len(items) / 2
    for item in read_qa(world.test_count):
        scene = parse_caption(rows[str(Path(item.video).relative_to(world.root))]["caption"])
        assert item.answer == COUNT_WORDS[len(scene.objects) - 1]


def test_two_video_questions_need_both_videos(world):
    """Stages 0 and 1 (and the held-out files) ask TWO_VIDEO_QUESTION about two videos: the answer names each video's
    background in order; stage 1 pairs its own training videos, so no held-out pair enters it."""
    stage0 = [ex for ex in read_manifest(world.stage0) if ex.turns[0].text.startswith("<video1>")]
    stage1 = [ex for ex in read_manifest(world.stage1) if len(ex.videos) == 2]
    assert len(stage0) >= 0.05 * world.counts["stage0"] and len(stage1) >= 0.05 * world.counts["stage1"]
    for ex in stage0:
        first, second, question, answer = ex.turns
        a, b = tagged_scene(first.text), tagged_scene(second.text)
        assert second.text.startswith("<video2>") and question.text == TWO_VIDEO_QUESTION
        assert answer.text == f"{a.background} and {b.background}"
    singles = {ex.videos[0] for ex in read_manifest(world.stage1) if len(ex.videos) == 1}
    for ex in stage1:
        assert [t.video for t in ex.turns[:2]] == [0, 1] and ex.turns[2].text == TWO_VIDEO_QUESTION
        assert set(ex.videos) <= singles and ex.videos[0] != ex.videos[1]
        a, b = (parse_caption(c) for c in ex.captions)
        assert ex.turns[3].text == f"{a.background} and {b.background}"
    rows = catalogue(world)
    pairs = [json.loads(line) for line in world.test_two_video.read_text().splitlines()]
    assert pairs
    for row in pairs:
        a, b = (parse_caption(rows[v]["caption"]) for v in row["videos"])
        assert row["question"] == TWO_VIDEO_QUESTION and row["answer"] == f"{a.background} and {b.background}"


def test_question_ambiguity_rules():
    scene = parse_caption("a small red circle grows, a big green circle shrinks and a big red square bounces on a "
                          "black background")
    questions = dict(ordinary_questions(scene))
    assert "What colour is the circle?" not in questions  # two circles
    assert "What shape is the red object?" not in questions  # two red objects
    assert questions["What colour is the square?"] == "red"
    assert questions["What shape is the green object?"] == "circle"
    assert questions["How does the green circle move?"] == "shrinks"
    assert questions["What is the background colour?"] == "black"


def test_stage2_video_examples_keep_a_stage1_video_and_never_ask_to_count(world):
    """examples.stage2_video_examples: a stage-1 training video (its caption with it), at most a true answer about it,
    then a generation request (whose answer test_generation_answers_hold_the_requested_scene checks)."""
    stage1 = {ex.videos[0]: ex.captions[0] for ex in read_manifest(world.stage1) if len(ex.videos) == 1}
    stage2 = read_manifest(world.stage2)
    rows = [ex for ex in stage2 if len(ex.videos) == 1]
    twos = [ex for ex in stage2 if len(ex.videos) == 2]
    n_text = len(stage2) - len(rows) - len(twos)
    assert len(rows) == round(n_text * STAGE2_VIDEO_FRACTION) > 0
    # examples.stage2_two_video_examples: stage 1's two-video question, about two of its videos, kept in stage 2
    assert len(twos) == round(n_text * STAGE2_TWO_VIDEO_FRACTION) > 0
    for ex in twos:
        assert [stage1[v] for v in ex.videos] == list(ex.captions) and ex.id.startswith("stage2-two-")
        assert [t.video for t in ex.turns[:2]] == [0, 1] and ex.turns[2].text == TWO_VIDEO_QUESTION
        assert ex.turns[3].text == two_video_answer(*map(parse_caption, ex.captions))
    for ex in rows:
        assert len(ex.videos) == 1 and stage1[ex.videos[0]] == ex.captions[0] and ex.turns[0].video == 0
        truth = {**dict(ordinary_questions(parse_caption(ex.captions[0]))), DESCRIBE_INSTRUCTION: ex.captions[0]}
        *pairs, (_, last) = qa_pairs(ex)
        assert last.startswith("Sure, here it is: <video>") and len(pairs) <= 1
        for q, a in pairs:
            assert q != COUNT_QUESTION and truth[q] == a, ex.id


def test_generation_answers_hold_the_requested_scene(world):
    generation = 0
    for ex in read_manifest(world.stage2):
        for request, answer in qa_pairs(ex):
            if not answer.startswith("Sure, here it is:"):
                continue
            requested = parse_request(request)
            assert answer == generation_answer(requested) == f"Sure, here it is: <video>{caption(requested)}</video>"
            assert same_scene(tagged_scene(answer), requested)
            generation += ex.turns[-1].text == answer
    assert generation >= 0.3 * world.counts["stage2"]
    for row in jsonl(world.test_generation):
        assert set(row) == {"id", "request", "caption"}
        assert caption(parse_request(row["request"])) == row["caption"]


def test_every_request_template_round_trips():
    rng = np.random.default_rng(0)
    for template in GENERATION_TEMPLATES + sum(language.LOOKALIKE_TEMPLATES.values(), ()):
        for _ in range(20):
            scene = random_scene(rng)
            assert parse_request(fill_request(template, scene)) == scene, template
            assert parse_request(fill_request(template, scene).upper()) == scene
    harmful = [r for split in language.HARMFUL_POOLS for r in language.harmful_requests(split)]
    for _, request in harmful + language.harmful_training_requests():
        with pytest.raises(ValueError, match="not a generation request"):
            parse_request(request)


def test_refusals_exactly_for_harmful_requests(world):
    assert all(is_refusal(r) for r in REFUSALS)
    harmful_requests = {r for _, r in language.harmful_training_requests()}
    labels = {"harmful": 0, "safe": 0}
    for ex in read_manifest(world.stage2):
        pairs = qa_pairs(ex)
        for request, answer in pairs:  # in a two-request chat too: each request gets its own answer
            assert is_refusal(answer) == (request in harmful_requests), (ex.id, request, answer)
            assert not is_refusal(answer) or answer in REFUSALS
        if ex.safety:  # the label is the last request's
            assert ex.safety == ("harmful" if pairs[-1][0] in harmful_requests else "safe")
            labels[ex.safety] += 1
        else:
            assert not any(is_refusal(a) for _, a in pairs), ex.id
    assert labels["harmful"] >= 0.1 * world.counts["stage2"] and labels["safe"] >= 0.1 * world.counts["stage2"]
    for name in ("stage0", "stage1"):
        for ex in read_manifest(getattr(world, name)):
            refuses = any(is_refusal(t.text) for t in ex.turns if t.role == "ai")
            # stage 0's plain-text corpus has refusal sentences among AI-only turns: never as the answer to a request
            assert ex.safety is None and (not refuses or (name == "stage0" and {t.role for t in ex.turns} == {"ai"}))


def test_some_stage2_requests_come_in_a_chats_second_turn_without_two_scenes_to_copy_from(world):
    firsts = {"harmful": [], "safe": []}  # the earlier answer of each two-request safety example
    for ex in read_manifest(world.stage2):
        pairs = qa_pairs(ex)
        granted = [a for _, a in pairs if a.startswith("Sure, here it is:")]
        assert len(granted) <= 1, ex.id  # copying from the right one of two requests is what the tiny LLM fails at
        if ex.safety and len(pairs) == 2:
            firsts[ex.safety].append("refused" if is_refusal(pairs[0][1]) else "granted")
        else:
            assert len(pairs) == 1 or not ex.safety, ex.id
    n_safety = sum(ex.safety is not None for ex in read_manifest(world.stage2))
    in_second_turn = len(firsts["harmful"]) + len(firsts["safe"])
    assert 0.15 * n_safety < in_second_turn < 0.45 * n_safety  # STAGE2_REQUEST_AFTER_EXCHANGE = 0.3
    assert {"granted", "refused"} == set(firsts["harmful"])  # a harmful request after a granted generation, too
    assert set(firsts["safe"]) == {"refused"}


def test_stage2_harmful_requests_come_in_the_safe_requests_wording_too(world):
    harmful = [qa_pairs(ex)[-1][0] for ex in read_manifest(world.stage2) if ex.safety == "harmful"]
    safe_patterns = [_template_pattern(t) for t in GENERATION_TEMPLATES + LOOKALIKE_TEMPLATES_TRAIN]
    in_safe_wording = [h for h in harmful if any(p.match(h) for p in safe_patterns)]
    assert 0 < len(in_safe_wording) < len(harmful)  # the content decides, not the template
    assert set(language.harmful_requests("train")) < set(language.harmful_training_requests())


def _template_pattern(template):
    before, after = re.split(r"\{\w+\}", template)
    return re.compile(re.escape(before) + ".+" + re.escape(after) + "$")


@pytest.mark.parametrize("split", ["test", "val"])
def test_safety_wording_of_train_and_held_out_splits_is_disjoint(world, split):
    other = {"test": "val", "val": "test"}[split]
    templates, contents = language.HARMFUL_POOLS[split]
    lookalikes = language.LOOKALIKE_TEMPLATES[split]
    for pool in ("train", other):  # neither training nor the other held-out split shares a template or phrase
        assert not set(templates) & set(language.HARMFUL_POOLS[pool][0])
        assert not set(lookalikes) & set(language.LOOKALIKE_TEMPLATES[pool])
        for cat in contents:
            assert not set(contents[cat]) & set(language.HARMFUL_POOLS[pool][1][cat])
    function_words = {"a", "an", "the", "with", "on", "in", "of", "to", "and", "until", "their", "someone",
                      "person", "man", "woman", "people", "being"}
    for cat in HARMFUL_CONTENT_TRAIN:
        train_words = set(" ".join(HARMFUL_CONTENT_TRAIN[cat]).split()) - function_words
        for phrase in contents[cat]:  # new phrases, but built around charged words seen in training
            assert set(phrase.split()) & train_words, phrase
    held_patterns = [_template_pattern(t) for t in templates + lookalikes]
    train_patterns = [_template_pattern(t) for t in HARMFUL_TEMPLATES_TRAIN + LOOKALIKE_TEMPLATES_TRAIN]
    held_contents = [x for xs in contents.values() for x in xs]
    stage2_requests = {q for ex in read_manifest(world.stage2) if ex.safety for q, _ in qa_pairs(ex)}
    for text in stage2_requests:  # no training request uses a held-out template or content phrase
        assert not any(p.match(text) for p in held_patterns), text
        assert not any(x in text for x in held_contents), text
    cases_file = world.safety_cases if split == "test" else world.val_safety_cases
    vg = [c for c in read_cases(cases_file) if c.task == "VG"]
    assert not {c.query for c in vg} & stage2_requests
    n_lookalikes = 0
    for case in vg:
        if case.label == "harmful":
            assert any(x in case.query for x in held_contents), case.query
        if case.label == "harmful" or any(p.match(case.query) for p in held_patterns):
            assert any(p.match(case.query) for p in held_patterns), case.query
            assert not any(p.match(case.query) for p in train_patterns), case.query
            n_lookalikes += case.label == "safe"
        else:  # a plain generation request (its templates are shared with training: the held-out pair is the test)
            assert any(_template_pattern(t).match(case.query) for t in GENERATION_TEMPLATES), case.query
    assert n_lookalikes > 0


def test_vu_cases_and_detector_examples_follow_the_hazard(world):
    rows = catalogue(world)
    for cases_file, split in ((world.safety_cases, "test"), (world.val_safety_cases, "val")):
        cases = read_cases(cases_file)
        for task in ("VU", "VG"):  # harmful and safe alternate, so a prefix of the file is balanced
            assert [c.label for c in cases if c.task == task][:4] == ["harmful", "safe"] * 2
        for case in cases:
            if case.task == "VU":
                row = rows[str(Path(case.video).relative_to(world.root))]
                assert row["hazard"] == (case.label == "harmful")
                assert row["split"] in ((split, "safety") if split == "test" else (split, "val-safety")), row
    examples = detector_examples(world.detector_train)
    assert {h for _, h in examples} == {True, False}
    for path, harmful in examples:
        row = rows[str(Path(path).relative_to(world.root))]
        assert row["hazard"] == harmful and row["split"] in ("train", "detector")
    bad = world.root / "bad_detector.jsonl"
    bad.write_text('{"video": "videos/x.mp4", "harmful": "yes"}\n')
    with pytest.raises(ValueError, match="bad_detector.jsonl:1"):
        detector_examples(bad)


def test_examples_are_deterministic_given_the_seed():
    make = lambda: (world_examples.stage0_examples(world_examples._rng(3, "stage0"), 50),  # noqa: E731
                    world_examples.stage2_examples(world_examples._rng(3, "stage2"), 50))
    assert make() == make()
    assert world_examples.stage2_examples(world_examples._rng(4, "stage2"), 50) != make()[1]
    assert world_text(1) == world_text(1)


def test_world_text_covers_every_word_of_the_data(world):
    corpus = set(" ".join(world_text(0)).split())
    words = set()
    for name in ("stage0", "stage1", "stage2"):
        for ex in read_manifest(getattr(world, name)):
            for t in texts(ex) + list(ex.captions):
                words.update(t.split())
    words.update(" ".join(c.query for c in read_cases(world.safety_cases)).split())
    words.update(" ".join(r["request"] for r in jsonl(world.test_generation)).split())
    # Held-out captions are made of training words; tags glue to the first and last word and byte-level BPE splits
    # punctuation off, so compare bare words. (Validation wording is not in the corpus: see world_text.)
    bare = lambda ws: {re.sub(r"</?video\d*>|[.,?!:]+$", "", w) for w in ws}  # noqa: E731
    # TWO_VIDEO_QUESTION came after the landed tokenizer, which is kept as it was built (see world_text)
    assert bare(words) - bare(corpus) - bare(TWO_VIDEO_QUESTION.split()) == set()


def test_bad_sizes_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="n_train_videos"):
        build_world(tmp_path, n_train_videos=0)
