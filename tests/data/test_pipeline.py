"""Tests for g4v_jax.data.pipeline: fixed batch shapes, video order and padding, label masking, stage-2 (text-only)
batches, skipping/raising on unreadable videos and long examples, determinism, worker processes giving the same
batches as none, iterator state resume, and host sharding. CPU; real tiny videos and a BPE tokenizer made here."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging

import numpy as np
import pytest

from g4v_jax.data.manifest import Example, ManifestError, replace_videos_with_captions
from g4v_jax.data.pipeline import (
    SKIP_REASONS,
    DataConfig,
    ExampleError,
    batch_iterator,
    batch_spec,
    count_problems,
    describe_problems,
    make_dataset,
    shard_examples,
)
from g4v_jax.data.template import (IGNORE_INDEX, VIDEO_PLACEHOLDER_ID, Turn, pad_batch, tokenize_conversation,
                                   tokenize_in_llm_template)
from g4v_jax.data.tokenizer import build_bpe_tokenizer
from g4v_jax.data.video import load_video, synthetic_frames, write_video

N_SLOTS = 3  # video tokens per video
CFG = DataConfig(seq_len=64, num_frames=2, image_size=16, num_video_tokens=N_SLOTS, max_videos_per_example=2,
                 system_prompt="Sys.", shuffle=False)
CORPUS = ["Sys. ###Human: <video></video> <video1></video1> <video2></video2> ###Human: What happens? ###AI: A red "
          "square moves. Compare the clips. answer question caption " + " ".join(str(i) for i in range(40))] * 4


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_bpe_tokenizer(CORPUS, tmp_path_factory.mktemp("tok"), vocab_size=320)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Six tiny real videos v0..v5 (different content each) and a corrupt file, in one directory."""
    d = tmp_path_factory.mktemp("videos")
    for i in range(6):
        write_video(d / f"v{i}.mp4", synthetic_frames(5, 24, 32, seed=i))
    (d / "corrupt.mp4").write_bytes(b"\x00garbage" * 32)
    return d


def example(i: int, videos: tuple[str, ...] = (), answer: str | None = None) -> Example:
    """Example ``e{i}`` showing ``videos`` (relative names), with captions, a question and a numbered answer."""
    turns = [Turn("human", video=k) for k in range(len(videos))]
    turns += [Turn("human", f"What happens {i}?"), Turn("ai", answer or f"A red square moves {i}.")]
    return Example(f"e{i}", tuple(videos), tuple(f"caption {i} {k}" for k in range(len(videos))), tuple(turns), None)


def mixed_examples(n: int) -> list[Example]:
    """e0..e{n-1} with 0, 1 or 2 videos each (cycling), all readable."""
    shapes = [("v{a}.mp4",), (), ("v{a}.mp4", "v{b}.mp4")]
    return [example(i, tuple(s.format(a=i % 6, b=(i + 1) % 6) for s in shapes[i % 3])) for i in range(n)]


def expected_row(ex: Example, tok, cfg: DataConfig = CFG) -> dict[str, np.ndarray]:
    """What the pipeline should put in a row, computed straight from the template."""
    if not cfg.use_videos:
        ex = replace_videos_with_captions(ex)
    conv = tokenize_conversation(tok, ex.turns, num_video_tokens=cfg.num_video_tokens, system_prompt=cfg.system_prompt)
    padded = pad_batch([conv], tok.pad_token_id, length=cfg.seq_len)
    return {k: padded[k][0] for k in ("input_ids", "labels", "attention_mask", "positions")}


def row_ids(batch: dict[str, np.ndarray], examples: list[Example], tok, cfg: DataConfig = CFG) -> list[str]:
    """Which example each row of ``batch`` is (rows are identified by their input_ids)."""
    table = {}
    for ex in examples:
        try:
            table[expected_row(ex, tok, cfg)["input_ids"].tobytes()] = ex.id
        except ValueError:  # longer than seq_len: never in a batch
            pass
    return [table[row.tobytes()] for row in batch["input_ids"]]


def take(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def dataset(examples, tok, data_dir, cfg=CFG, *, batch=2, epochs=1, **kw):
    return make_dataset(examples, tok, cfg, per_host_batch=batch, epochs=epochs, manifest_dir=data_dir, **kw)


# --------------------------------------------------------------------------------------------------------------------
# batch contents
# --------------------------------------------------------------------------------------------------------------------


def test_batch_shapes_dtypes_and_rows(tok, data_dir):
    examples = mixed_examples(6)
    batches = list(batch_iterator(dataset(examples, tok, data_dir, batch=3)))
    assert len(batches) == 2
    spec = batch_spec(CFG, 3)
    assert spec["videos"][0] == (3, 2, 2, 16, 16, 3) and spec["frame_mask"][0] == (3, 2, 2)
    for batch in batches:
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == spec
    # shuffle=False: rows in manifest order, each exactly what the template gives
    assert [row_ids(b, examples, tok) for b in batches] == [["e0", "e1", "e2"], ["e3", "e4", "e5"]]
    for b, batch in enumerate(batches):
        for r in range(3):
            for key, value in expected_row(examples[3 * b + r], tok).items():
                np.testing.assert_array_equal(batch[key][r], value, err_msg=key)
    first = batches[0]
    # right padding with the pad id; positions count real tokens
    n = int(first["attention_mask"][0].sum())
    assert first["attention_mask"][0, :n].all() and not first["attention_mask"][0, n:].any()
    assert (first["input_ids"][0, n:] == tok.pad_token_id).all()
    np.testing.assert_array_equal(first["positions"][0, :n], np.arange(n))
    assert (first["positions"][0, n:] == 0).all()


def test_labels_only_on_answers(tok, data_dir):
    ex = example(0, ("v0.mp4",), answer="Answer words here.")
    (batch,) = list(batch_iterator(dataset([ex], tok, data_dir, batch=1)))
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    labelled = labels != IGNORE_INDEX
    np.testing.assert_array_equal(labels[labelled], ids[labelled])  # labels are the tokens themselves
    assert tok.decode(ids[labelled][:-1]) == " Answer words here."
    assert ids[labelled][-1] == tok.eos_token_id  # the answer's EOS is trained on
    assert not labelled[ids == VIDEO_PLACEHOLDER_ID].any()
    assert not labelled[~batch["attention_mask"][0]].any()
    assert (ids == VIDEO_PLACEHOLDER_ID).sum() == N_SLOTS


def test_videos_travel_with_their_rows(tok, data_dir):
    # rows: [2 videos, none] then [1 video, 2 videos]; max 2 per example -> videos (2, 2, T, S, S, 3) per batch
    examples = [example(0, ("v0.mp4", "v1.mp4")), example(1), example(2, ("v2.mp4",)), example(3, ("v3.mp4", "v4.mp4"))]
    b1, b2 = list(batch_iterator(dataset(examples, tok, data_dir)))

    def clip(name):
        return load_video(data_dir / name, num_frames=CFG.num_frames, size=CFG.image_size)

    for batch, rows in ((b1, [["v0.mp4", "v1.mp4"], []]), (b2, [["v2.mp4"], ["v3.mp4", "v4.mp4"]])):
        assert batch["videos"].shape == (2, 2, 2, 16, 16, 3) and batch["frame_mask"].shape == (2, 2, 2)
        for b, names in enumerate(rows):
            for i, name in enumerate(names):  # row b's i-th video is the one its i-th slot run is for
                np.testing.assert_array_equal(batch["videos"][b, i], clip(name).frames)
                np.testing.assert_array_equal(batch["frame_mask"][b, i], clip(name).frame_mask)
            assert batch["frame_mask"][b, : len(names)].all()
            # padding videos: zeros, never marked real
            assert not batch["frame_mask"][b, len(names) :].any() and not batch["videos"][b, len(names) :].any()
            assert (batch["input_ids"][b] == VIDEO_PLACEHOLDER_ID).sum() == N_SLOTS * len(names)


def test_stage2_text_only(tok, data_dir):
    cfg = dataclasses.replace(CFG, use_videos=False)
    examples = [example(0, ("v0.mp4",)), example(1, ("v1.mp4", "v2.mp4")), example(2)]
    examples[0] = dataclasses.replace(examples[0], videos=("does_not_exist.mp4",))  # stage 2 never opens videos
    (batch,) = list(batch_iterator(dataset(examples, tok, data_dir, cfg, batch=3)))
    assert set(batch) == {"input_ids", "labels", "attention_mask", "positions"} == set(batch_spec(cfg, 3))
    assert not (batch["input_ids"] == VIDEO_PLACEHOLDER_ID).any()
    texts = [tok.decode(row[mask]) for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert "<video>caption 0 0</video>" in texts[0]
    assert "<video1>caption 1 0</video1> ###Human: <video2>caption 1 1</video2>" in texts[1]

    uncaptioned = [dataclasses.replace(examples[1], captions=())]
    with pytest.raises(ManifestError, match=r"use_videos=false .* 1 example\(s\) with videos have no captions.*'e1'"):
        dataset(uncaptioned, tok, data_dir, cfg, batch=1)


@pytest.mark.parametrize("stage,keep,uses_videos", [("stage1", False, True), ("stage2", False, False),
                                                   ("stage2", True, True), ("full", True, False)])
def test_which_stages_read_real_videos(stage, keep, uses_videos):
    from g4v_jax.config import load_config
    from g4v_jax.data.pipeline import pipeline_config

    cfg = load_config("tiny", [f"train.stage={stage}", f"data.stage2_keep_videos={str(keep).lower()}"])
    assert pipeline_config(cfg).use_videos is uses_videos


# --------------------------------------------------------------------------------------------------------------------
# skipped examples
# --------------------------------------------------------------------------------------------------------------------


def test_bad_videos_skipped_or_raise(tok, data_dir, caplog):
    examples = mixed_examples(6)
    examples[1] = example(1, ("corrupt.mp4",))
    examples[4] = example(4, ("v0.mp4", "missing.mp4"))
    report = count_problems(examples, tok, CFG, data_dir)
    assert {k: report[k] for k in ("examples", "ok", "skipped", *SKIP_REASONS)} == {
        "examples": 6, "ok": 4, "skipped": 2, "unreadable_video": 2, "too_long": 0, "too_many_videos": 0}
    assert [p["id"] for p in report["problems"]] == ["e1", "e4"]
    assert "missing.mp4" in report["problems"][1]["detail"]
    assert describe_problems(report) == "2 of 6 examples will be skipped (2 unreadable video)"

    with caplog.at_level(logging.WARNING, logger="g4v_jax.data.pipeline"):
        it = batch_iterator(dataset(examples, tok, data_dir))
        batches = list(it)
    assert [row_ids(b, examples, tok) for b in batches] == [["e0", "e2"], ["e3", "e5"]]
    assert it.skipped == {"unreadable_video": 2, "too_long": 0, "too_many_videos": 0}
    assert it.get_state()["skipped"] == it.skipped
    assert "skipping example 'e1' (unreadable_video)" in caplog.text and "corrupt.mp4" in caplog.text

    hopeless = [example(0, ("corrupt.mp4",)), example(1, ("missing.mp4",))]
    with pytest.raises(ValueError, match=r"every one of this host's 2 examples is skipped .*'unreadable_video': 4"):
        next(batch_iterator(dataset(hopeless, tok, data_dir, batch=1, epochs=None)))  # instead of looping forever

    strict = dataclasses.replace(CFG, on_bad_video="error")
    with pytest.raises(ExampleError, match=r"example 'e1': unreadable video: .*corrupt\.mp4.*on_bad_video='error'"):
        list(batch_iterator(dataset(examples, tok, data_dir, strict)))


def test_too_long_and_too_many_videos(tok, data_dir):
    long_answer = " ".join(str(i) for i in range(40))
    examples = [example(0), example(1, answer=long_answer), example(2, ("v0.mp4", "v1.mp4", "v2.mp4")), example(3),
                example(4), example(5)]
    assert len(expected_row(example(0), tok)["input_ids"]) == CFG.seq_len
    with pytest.raises(ValueError):  # e1 really is longer than seq_len
        expected_row(examples[1], tok)
    it = batch_iterator(dataset(examples, tok, data_dir))
    assert [row_ids(b, examples, tok) for b in it] == [["e0", "e3"], ["e4", "e5"]]
    assert it.skipped == {"unreadable_video": 0, "too_long": 1, "too_many_videos": 1}
    report = count_problems(examples, tok, CFG, data_dir, check_videos=False)
    assert (report["too_long"], report["too_many_videos"], report["skipped"]) == (1, 1, 2)

    strict = dataclasses.replace(CFG, on_too_long="error")
    with pytest.raises(ExampleError, match=r"example 'e1': is \d+ tokens long .* data\.seq_len=64; it is never trunc"):
        list(batch_iterator(dataset(examples, tok, data_dir, strict)))
    with pytest.raises(ExampleError, match=r"example 'e2': has 3 videos, more than data.max_videos_per_example=2"):
        list(batch_iterator(dataset(examples[2:], tok, data_dir, strict)))


def test_whole_run_errors(tok, data_dir):
    with pytest.raises(ValueError, match="data.on_bad_video must be skip or error"):
        DataConfig(on_bad_video="ignore")
    with pytest.raises(ValueError, match="data.seq_len must be an integer >= 2"):
        DataConfig(seq_len=0)
    no_answer = Example("q", (), (), (Turn("human", "Only a question."),), "harmful")
    with pytest.raises(ValueError, match=r"1 example\(s\) have no AI turn.*'q'"):
        dataset([no_answer], tok, data_dir, batch=1)
    with pytest.raises(ValueError, match="fewer than one batch"):
        dataset(mixed_examples(3), tok, data_dir, batch=4)
    with pytest.raises(ValueError, match="per_host_batch must be an integer >= 1"):
        dataset(mixed_examples(3), tok, data_dir, batch=0)


# --------------------------------------------------------------------------------------------------------------------
# order, determinism, resume, workers, hosts
# --------------------------------------------------------------------------------------------------------------------


def test_shuffle_is_seeded_per_epoch(tok, data_dir):
    examples = [example(i) for i in range(8)]  # text only: fast
    cfg = dataclasses.replace(CFG, shuffle=True, seed=3)

    def order(c, epochs=2):
        batches = batch_iterator(dataset(examples, tok, data_dir, c, batch=4, epochs=epochs))
        return [row_ids(batch, examples, tok) for batch in batches]

    ids, again = order(cfg), order(cfg)
    assert ids == again and len(ids) == 4
    epoch1, epoch2 = ids[0] + ids[1], ids[2] + ids[3]
    assert sorted(epoch1) == sorted(epoch2) == sorted(e.id for e in examples)  # every epoch sees every example once
    assert epoch1 != epoch2 and epoch1 != [e.id for e in examples]
    other = dataclasses.replace(cfg, seed=4)
    assert order(other, epochs=1) != ids[:2]


def test_resume_from_state(tok, data_dir):
    examples = mixed_examples(9)
    examples[4] = example(4, ("corrupt.mp4",))  # a skip inside the resumed range
    cfg = dataclasses.replace(CFG, shuffle=True)
    ds = dataset(examples, tok, data_dir, cfg, epochs=None)  # forever
    it = batch_iterator(ds)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    b4, b5 = take(it, 2)
    resumed = batch_iterator(dataset(examples, tok, data_dir, cfg, epochs=None))
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 2), [b4, b5])
    assert resumed.get_state() == it.get_state()  # skip counts included

    it.set_state(state)  # rewinding an iterator in use works too
    assert_batches_equal(take(it, 2), [b4, b5])

    elsewhere = batch_iterator(dataset(examples, tok, data_dir, dataclasses.replace(cfg, seed=1), epochs=None))
    with pytest.raises(ValueError, match="saved for another element order.*data.seed"):
        elsewhere.set_state(state)
    with pytest.raises(ValueError, match="not a data iterator state"):
        elsewhere.set_state({"next_index": 3})


def test_workers_give_the_same_batches_and_resume(tok, data_dir):
    """worker_count=2 (processes) == worker_count=0, batch for batch; the state does not depend on the worker count,
    and a fresh 2-worker iterator resumes from a saved state."""
    examples = mixed_examples(11)
    examples[3] = example(3, ("corrupt.mp4",))  # a skip: must not shift rows between batches with workers
    cfg = dataclasses.replace(CFG, shuffle=True, seed=5)
    serial = batch_iterator(dataset(examples, tok, data_dir, cfg, epochs=None))
    expected = take(serial, 3)
    state = serial.get_state()
    expected += take(serial, 2)
    assert serial.get_state()["skipped"]["unreadable_video"] >= 1  # the skip happened within these batches

    workers = dataclasses.replace(cfg, worker_count=2)
    resumed = batch_iterator(dataset(examples, tok, data_dir, workers, epochs=None))
    parallel = batch_iterator(dataset(examples, tok, data_dir, workers, epochs=None))
    try:
        resumed.set_state(json.loads(json.dumps(state)))
        resumed.start_prefetch()  # spawn its workers now, alongside the other iterator's (keeps the test short)
        got = take(parallel, 3)
        assert parallel.get_state() == state  # what a 2-worker run would checkpoint is the same state
        got += take(parallel, 2)
        assert_batches_equal(got, expected)
        assert_batches_equal(take(resumed, 2), expected[3:])
    finally:
        parallel.close()
        resumed.close()


def test_host_sharding_disjoint_and_covering(tok, data_dir):
    examples = [example(i) for i in range(10)]
    shards = [shard_examples(examples, p, 3) for p in range(3)]
    assert sorted(e.id for s in shards for e in s) == sorted(e.id for e in examples)
    assert [len(s) for s in shards] == [4, 3, 3]
    with pytest.raises(ValueError, match="process_index < process_count"):
        shard_examples(examples, 3, 3)

    seen = []
    for p in range(2):
        ds = dataset(examples, tok, data_dir, dataclasses.replace(CFG, shuffle=True), batch=5,
                     process_index=p, process_count=2)
        seen.append({i for b in batch_iterator(ds) for i in row_ids(b, examples, tok)})
    assert not seen[0] & seen[1] and seen[0] | seen[1] == {e.id for e in examples}


# --------------------------------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------------------------------


PACKED = dataclasses.replace(CFG, use_videos=False, pack_sequences=True, seq_len=96)


def segments_of(batch: dict[str, np.ndarray], b: int) -> list[dict[str, np.ndarray]]:
    """Row ``b`` of a packed batch cut into its segments."""
    seg = batch["segment_ids"][b]
    return [{k: batch[k][b][seg == s] for k in ("input_ids", "labels", "positions")} for s in range(1, seg.max() + 1)]


def first_fit(lengths, seq_len: int, rows: int) -> list[list[int]]:
    """The example indices of each row of one batch, packed first-fit in order (the pipeline's rule, by hand)."""
    bins, used = [], []
    for i, n in enumerate(lengths):
        room = next((k for k, u in enumerate(used) if u + n <= seq_len), None)
        if room is None and len(bins) == rows:
            break
        if room is None:
            bins.append([]), used.append(0)
            room = len(bins) - 1
        bins[room].append(i)
        used[room] += n
    return bins


def test_packed_rows_hold_examples_first_fit_each_as_alone(tok, data_dir):
    examples = mixed_examples(12)
    (batch,) = take(batch_iterator(dataset(examples, tok, data_dir, PACKED, batch=3, epochs=1)), 1)
    assert set(batch) == set(batch_spec(PACKED, 3)) and batch["segment_ids"].shape == (3, 96)
    np.testing.assert_array_equal(batch["attention_mask"], batch["segment_ids"] > 0)
    unpacked = dataclasses.replace(PACKED, pack_sequences=False)
    wanted = [expected_row(ex, tok, unpacked) for ex in examples]
    lengths = [int(w["attention_mask"].sum()) for w in wanted]
    bins = first_fit(lengths, 96, rows=3)
    assert sum(map(len, bins)) > 2  # several examples a row
    # row 0 takes an example after row 1 has opened (next-fit would not)
    assert max(bins[0]) > min(bins[1]), \
        f"no gap filled in {bins} ({lengths}): these lengths cannot tell first-fit from next-fit"
    for b, indices in enumerate(bins):
        found = segments_of(batch, b)
        assert len(found) == len(indices)
        for seg, i in zip(found, indices):
            n = lengths[i]
            np.testing.assert_array_equal(seg["input_ids"], wanted[i]["input_ids"][:n])
            np.testing.assert_array_equal(seg["positions"], np.arange(n))
            np.testing.assert_array_equal(seg["labels"][1:], wanted[i]["labels"][1:n])
            assert seg["labels"][0] == IGNORE_INDEX  # nothing learns to predict across a border
    # the first example that fits no row opens the next batch, and nothing before it is left out
    nxt = max(i for row in bins for i in row) + 1
    assert sorted(i for row in bins for i in row) == list(range(nxt))
    assert all(batch["attention_mask"][b].sum() + lengths[nxt] > 96 for b in range(3))


def test_packed_resume_gives_the_same_batches(tok, data_dir):
    examples = mixed_examples(15)
    cfg = dataclasses.replace(PACKED, shuffle=True)
    it = batch_iterator(dataset(examples, tok, data_dir, cfg, batch=2, epochs=None))
    take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    later = take(it, 3)
    resumed = batch_iterator(dataset(examples, tok, data_dir, cfg, batch=2, epochs=None))
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 3), later)
    assert resumed.get_state() == it.get_state()


def test_distill_marks_the_tokens_of_marked_examples_plain_and_packed(tok, data_dir):
    """``distill`` (train.distill_weight > 0) is True exactly on the real tokens of examples marked in the
    manifest, in plain rows and in packed ones; without it the batch has no such array."""
    examples = [dataclasses.replace(example(i), distill=i % 2 == 1) for i in range(6)]
    text = dataclasses.replace(CFG, use_videos=False)
    assert "distill" not in next(batch_iterator(dataset(examples, tok, data_dir, text, batch=3)))
    for cfg in (dataclasses.replace(text, distill=True), dataclasses.replace(PACKED, distill=True)):
        # two rows a batch: packed, the six examples fill two rows of three; the last batch is never partial
        batches = list(batch_iterator(dataset(examples, tok, data_dir, cfg, batch=2)))
        assert all({k: (v.shape, v.dtype) for k, v in b.items()} == batch_spec(cfg, 2) for b in batches)
        marked = []
        for batch in batches:
            for r in range(2):
                if cfg.pack_sequences:
                    seg = batch["segment_ids"][r]
                    parts = [(batch["input_ids"][r][seg == k], batch["distill"][r][seg == k])
                             for k in range(1, seg.max() + 1)]
                    assert not batch["distill"][r][seg == 0].any()
                else:
                    n = int(batch["attention_mask"][r].sum())
                    parts = [(batch["input_ids"][r][:n], batch["distill"][r][:n])]
                    assert not batch["distill"][r][n:].any()
                for ids, flags in parts:
                    assert flags.all() or not flags.any()  # a whole example, or none of it
                    ex = next(e for e in examples
                              if np.array_equal(expected_row(e, tok, text)["input_ids"][:len(ids)], ids))
                    assert flags.all() == ex.distill
                    if ex.distill:
                        marked.append(ex.id)
        assert sorted(marked) == ["e1", "e3", "e5"]


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_rows_in_the_llm_template_beside_gpt4video_rows_plain_and_packed(tok, data_dir, monkeypatch):
    """``"template": "llm"`` rows are the tokenizer's chat template (``tokenize_in_llm_template``), labels on the
    answers, the adapters on every token; the other rows keep GPT4Video's prompt. One too long for a row is skipped
    like any other, without the labelling's rendering per answer. A tokenizer without a chat template stops at that
    example, by name."""
    from g4v_jax.data import pipeline

    labelled = []
    label = pipeline.llm_template_labels
    monkeypatch.setattr(pipeline, "llm_template_labels",
                        lambda tokenizer, turns, ids: labelled.append(turns) or label(tokenizer, turns, ids))
    chat = copy.deepcopy(tok)
    chat.chat_template = CHATML
    examples = [dataclasses.replace(example(i), template="llm" if i % 2 else "gpt4video") for i in range(4)]
    long = dataclasses.replace(example(9, answer=" ".join(["A red square moves."] * 80)), template="llm")
    text = dataclasses.replace(CFG, use_videos=False, seq_len=128, adapter_mask=True)
    for cfg in (text, dataclasses.replace(PACKED, seq_len=256, adapter_mask=True)):
        labelled.clear()
        rows = []
        for batch in batch_iterator(dataset([*examples, long], chat, data_dir, cfg, batch=1)):
            for r in range(len(batch["input_ids"])):
                seg = batch["segment_ids"][r] if cfg.pack_sequences else batch["attention_mask"][r].astype(np.int32)
                for k in range(1, seg.max() + 1):
                    rows.append({key: batch[key][r][seg == k] for key in ("input_ids", "labels", "adapter_mask")})
        assert len(rows) == 4
        for ex in examples:
            if ex.template == "llm":
                want = tokenize_in_llm_template(chat, ex.turns)
            else:
                want = tokenize_conversation(chat, ex.turns, num_video_tokens=N_SLOTS, system_prompt=CFG.system_prompt)
            (row,) = [r for r in rows if np.array_equal(r["input_ids"], want.input_ids)]
            np.testing.assert_array_equal(row["labels"], want.labels)
            assert row["adapter_mask"].all()  # text only: the adapters act everywhere
        assert sum(chat.decode(r["input_ids"]).startswith("<|im_start|>user") for r in rows) == 2
        assert long.turns not in labelled and examples[1].turns in labelled
    with pytest.raises(ExampleError, match="example 'e1' .*has no chat template"):
        list(batch_iterator(dataset(examples, tok, data_dir, text, batch=2)))


def test_packing_is_for_text_rows_and_counts_rows_like_the_iterator(tok, data_dir):
    from g4v_jax.data.packing import packed_row_count

    with pytest.raises(ValueError, match="pack_sequences packs text rows"):
        batch_spec(dataclasses.replace(PACKED, use_videos=True), 1)
    assert packed_row_count([50, 40, 10, 90, 96, 1], 96, rows_per_batch=1) == 5  # [50 40] [10] [90] [96] [1]
    # 2 rows a batch: [50 40] [10] | [90 1] [96] (90 fits neither row of the full first batch; 1 fills [90]'s gap)
    assert packed_row_count([50, 40, 10, 90, 96, 1], 96, rows_per_batch=2) == 4
    examples = mixed_examples(11)
    lengths = count_problems(examples, tok, PACKED, data_dir)["lengths"]
    for rows_per_batch in (1, 3):
        batches = list(batch_iterator(dataset(examples, tok, data_dir, PACKED, batch=rows_per_batch, epochs=1)))
        rows = [row for b in batches for row in b["segment_ids"] if row.max() > 0]
        counted = packed_row_count(lengths, PACKED.seq_len, rows_per_batch)
        assert len(rows) <= counted < len(examples)  # the last, partial batch is dropped
        if rows_per_batch == 1:
            assert len(rows) == counted and sum(int(r.max()) for r in rows) == len(examples)
