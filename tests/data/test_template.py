"""Tests for g4v_jax.data.template and g4v_jax.data.tokenizer: label masking, video slots, render/decode agreement,
generation prompts, batching, and the offline byte-level BPE. CPU, tokenizers trained here (nothing downloaded)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from g4v_jax.data.template import (
    IGNORE_INDEX,
    SYSTEM_PROMPT,
    VIDEO_PLACEHOLDER_ID,
    TokenizedConversation,
    Turn,
    pad_batch,
    render,
    tokenize_conversation,
    tokenize_in_llm_template,
    video_tags,
)
from g4v_jax.data.tokenizer import build_bpe_tokenizer, load_tokenizer

N = 5  # video tokens per video (65 in the paper; small keeps the arrays readable)

CORPUS = [
    SYSTEM_PROMPT,
    "###Human: <video></video> ###Human: What happens in the video? ###AI: A dog runs across the park.",
    "###Human: <video1></video1> ###Human: <video2></video2> ###Human: <video3></video3> ###AI: Three clips.",
    "###Human: Describe the scene. ###AI: A red square moves from left to right over a gradient.",
    "###Human: Make a video of a cat. ###AI: Sure. Here is a prompt: a cat sleeping on a sofa, soft light.",
    "The quick brown fox jumps over the lazy dog. Colours, shapes and motion.",
]

VIDEO_CONV = (
    Turn("human", video=0),
    Turn("human", "What happens in the video?"),
    Turn("ai", "A dog runs across the park."),
    Turn("human", "And then?"),
    Turn("ai", "It stops."),
)
THREE_VIDEOS = (
    Turn("human", video=0),
    Turn("human", video=1),
    Turn("human", video=2),
    Turn("human", "Compare them."),
    Turn("ai", "Three clips."),
)
TEXT_CONV = (Turn("human", "Make a video of a cat."), Turn("ai", "Sure. Here is a prompt: a cat sleeping."))


# --------------------------------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bpe")
    build_bpe_tokenizer(CORPUS, out, vocab_size=512)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def tok_no_bos(tok_dir):
    """The same BPE with EOS but no BOS (GPT-2-like special tokens)."""
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(tok_dir / "tokenizer.json")), eos_token="</s>", pad_token="<pad>"
    )


def _sentencepiece_like(tmp_path: Path, legacy: bool):
    """A LLaMA-like tokenizer: "▁" for spaces and a "▁" prepended to every encode call (which the template's
    continuation encoding must absorb). ``legacy``: the Prepend/Replace normaliser of older LLaMA tokenizer.json files,
    which prepends even to text that already starts with a space; otherwise the Metaspace(prepend_scheme="first") that
    transformers converts sentencepiece models to."""
    model = Tokenizer(models.BPE(unk_token="<unk>"))
    if legacy:
        model.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        model.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=True)
        model.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:
        model.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)
        model.decoder = decoders.Metaspace(prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=["\n"],
                                  show_progress=False)
    model.train_from_iterator(CORPUS, trainer=trainer)
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", bos_token="<s>",
                                                   eos_token="</s>")
    wrapped.save_pretrained(str(tmp_path))
    return load_tokenizer(tmp_path)


@pytest.fixture(scope="module")
def all_tokenizers(tok, tok_no_bos, tmp_path_factory):
    return {
        "bpe": tok,
        "bpe_no_bos": tok_no_bos,
        "metaspace": _sentencepiece_like(tmp_path_factory.mktemp("metaspace"), legacy=False),
        "legacy_llama": _sentencepiece_like(tmp_path_factory.mktemp("legacy"), legacy=True),
    }


def enc(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def tokens_of(tokenizer, ids) -> list[str]:
    return tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def text_of(tokenizer, ids: np.ndarray) -> str:
    """Decoded text of ``ids`` with the video slots left out."""
    return tokenizer.decode(ids[ids != VIDEO_PLACEHOLDER_ID], clean_up_tokenization_spaces=False)


def slot_runs(ids: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each maximal run of VIDEO_PLACEHOLDER_ID."""
    is_slot = np.concatenate([[False], ids == VIDEO_PLACEHOLDER_ID, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(is_slot))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


# --------------------------------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------------------------------


def test_labels_are_exactly_the_answers_and_their_eos(tok):
    conv = tokenize_conversation(tok, VIDEO_CONV, num_video_tokens=N)
    ids, labels = conv.input_ids, conv.labels
    assert ids.dtype == labels.dtype == np.int32 and ids.shape == labels.shape and conv.num_videos == 1
    assert ids[0] == tok.bos_token_id and labels[0] == IGNORE_INDEX

    trained = labels != IGNORE_INDEX
    np.testing.assert_array_equal(labels[trained], ids[trained])  # labels are the ids themselves (shift is the model's)
    answers = [t.text for t in VIDEO_CONV if t.role == "ai"]
    assert tok.decode(ids[trained]) == "".join(f" {a}</s>" for a in answers)
    # each answer is one contiguous labelled run ending in EOS, and nothing else is labelled
    runs = np.flatnonzero(np.diff(np.concatenate([[0], trained.astype(np.int8), [0]])))
    assert len(runs) == 2 * len(answers)
    for start, stop, answer in zip(runs[::2], runs[1::2], answers):
        np.testing.assert_array_equal(ids[start:stop], enc(tok, " " + answer) + [tok.eos_token_id])
        assert tokens_of(tok, ids[start - 3 : start]) == ["Ġ###", "AI", ":"]  # the AI prefix, not labelled
    assert (ids == tok.eos_token_id).sum() == len(answers)


def test_conversation_ending_with_human_has_no_trailing_labels(tok):
    conv = tokenize_conversation(tok, VIDEO_CONV[:4], num_video_tokens=N)
    last_label = np.flatnonzero(conv.labels != IGNORE_INDEX)[-1]
    assert conv.input_ids[last_label] == tok.eos_token_id
    assert tok.decode(conv.input_ids[last_label + 1 :]) == " ###Human: And then?"


# --------------------------------------------------------------------------------------------------------------------
# videos
# --------------------------------------------------------------------------------------------------------------------


def test_single_video_slots_sit_between_the_tags(tok):
    conv = tokenize_conversation(tok, VIDEO_CONV, num_video_tokens=N)
    ids = conv.input_ids
    [(start, stop)] = slot_runs(ids)
    assert stop - start == N and (ids == VIDEO_PLACEHOLDER_ID).sum() == N
    assert (conv.labels[start:stop] == IGNORE_INDEX).all()
    assert tok.decode(ids[:start]).endswith("###Human: <video>")
    assert tok.decode(ids[stop:]).startswith("</video> ###Human: What happens")
    assert video_tags(0, 1) == ("<video>", "</video>")


def test_three_videos_get_numbered_tags_and_their_own_slots(tok):
    conv = tokenize_conversation(tok, THREE_VIDEOS, num_video_tokens=N)
    ids = conv.input_ids
    runs = slot_runs(ids)
    assert conv.num_videos == 3 and len(runs) == 3 and all(stop - start == N for start, stop in runs)
    for k, (start, stop) in enumerate(runs):
        open_tag, close_tag = video_tags(k, 3)
        assert (open_tag, close_tag) == (f"<video{k + 1}>", f"</video{k + 1}>")
        assert text_of(tok, ids[:start]).endswith(f"###Human: {open_tag}")
        assert text_of(tok, ids[stop:]).startswith(close_tag + (" ###Human:" if k < 2 else ""))
    assert render(THREE_VIDEOS, system_prompt="", video_text="V") == (
        "###Human: <video1>V</video1> ###Human: <video2>V</video2> ###Human: <video3>V</video3> "
        "###Human: Compare them. ###AI: Three clips."
    )


def test_video_prefix_ends_at_the_last_video_spans_close_tag(tok):
    """lora.skip_video_span keeps the adapters off up to here: the close tag of the last video, whether the video is
    slots (stages 1, inference) or its caption in tags (stage 2); 0 without a video."""
    conv = tokenize_conversation(tok, VIDEO_CONV, num_video_tokens=N)
    assert text_of(tok, conv.input_ids[:conv.video_prefix]).endswith("</video>")
    assert text_of(tok, conv.input_ids[conv.video_prefix:]).startswith(" ###Human: What happens")
    three = tokenize_conversation(tok, THREE_VIDEOS, num_video_tokens=N)
    assert text_of(tok, three.input_ids[:three.video_prefix]).endswith("</video3>")
    assert text_of(tok, three.input_ids[three.video_prefix:]).startswith(" ###Human: Compare them.")
    captioned = (Turn("human", "<video>a dog runs</video>"), *VIDEO_CONV[1:])
    conv = tokenize_conversation(tok, captioned, num_video_tokens=N)
    assert tok.decode(conv.input_ids[:conv.video_prefix]).endswith("<video>a dog runs</video>")
    assert tok.decode(conv.input_ids[conv.video_prefix:]).startswith(" ###Human: What happens")
    # a request that mentions tags is not a video; neither is text with no tags
    for text in ("Make <video>a dog</video> please", "a dog runs"):
        assert tokenize_conversation(tok, (Turn("human", text),), num_video_tokens=N).video_prefix == 0
    assert tokenize_conversation(tok, TEXT_CONV, num_video_tokens=N).video_prefix == 0
    padded = pad_batch([tokenize_conversation(tok, VIDEO_CONV, num_video_tokens=N),
                        tokenize_conversation(tok, TEXT_CONV, num_video_tokens=N)], pad_id=0, side="left")
    first = tokenize_conversation(tok, VIDEO_CONV, num_video_tokens=N)
    row = padded["adapter_mask"][0][padded["attention_mask"][0]]
    assert not row[:first.video_prefix].any() and row[first.video_prefix:].all()
    np.testing.assert_array_equal(padded["adapter_mask"][1], padded["attention_mask"][1])


def test_text_only_conversation_has_no_slots(tok):
    conv = tokenize_conversation(tok, TEXT_CONV, num_video_tokens=N)
    assert conv.num_videos == 0 and not (conv.input_ids == VIDEO_PLACEHOLDER_ID).any()
    assert (conv.input_ids >= 0).all()


@pytest.mark.parametrize("indices", [[1], [0, 0], [1, 0], [0, 2], [0, 1, 1]])
def test_bad_video_numbering_is_an_error(tok, indices):
    turns = [Turn("human", video=i) for i in indices] + [Turn("ai", "ok")]
    with pytest.raises(ValueError, match=r"numbered 0\.\.\d+ in order of appearance.*indices \["):
        tokenize_conversation(tok, turns, num_video_tokens=N)
    with pytest.raises(ValueError, match="in order of appearance"):
        render(turns)


# --------------------------------------------------------------------------------------------------------------------
# render <-> tokens
# --------------------------------------------------------------------------------------------------------------------


def test_render_format():
    assert render(VIDEO_CONV) == (
        SYSTEM_PROMPT + " ###Human: <video><VIDEO></video> ###Human: What happens in the video? "
        "###AI: A dog runs across the park. ###Human: And then? ###AI: It stops."
    )
    assert render(TEXT_CONV[:1], system_prompt="", add_generation_prompt=True) == (
        "###Human: Make a video of a cat. ###AI:"
    )


@pytest.mark.parametrize("name", ["bpe", "bpe_no_bos", "metaspace", "legacy_llama"])
@pytest.mark.parametrize(
    "turns, system_prompt, gen",
    [
        (VIDEO_CONV, SYSTEM_PROMPT, False),
        (THREE_VIDEOS, SYSTEM_PROMPT, False),
        (TEXT_CONV, "", False),
        (VIDEO_CONV[:4], SYSTEM_PROMPT, True),
        ((Turn("human", video=0),), "", True),
    ],
)
def test_decode_equals_render(all_tokenizers, name, turns, system_prompt, gen):
    tokenizer = all_tokenizers[name]
    conv = tokenize_conversation(tokenizer, turns, num_video_tokens=N, system_prompt=system_prompt,
                                 add_generation_prompt=gen)
    ids = conv.input_ids[conv.input_ids != VIDEO_PLACEHOLDER_ID]
    assert (ids[0] == tokenizer.bos_token_id) == (tokenizer.bos_token_id is not None)
    decoded = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert decoded == render(turns, system_prompt=system_prompt, add_generation_prompt=gen, video_text="")


def test_continuation_encoding_drops_the_sentencepiece_prefix_space(all_tokenizers):
    """The case the newline anchor exists for: a separately encoded piece gets a "▁" it must not have."""
    llama = all_tokenizers["metaspace"]
    assert tokens_of(llama, enc(llama, "</video>"))[0] == "▁"  # what a plain per-piece encode would insert
    ids = tokenize_conversation(llama, VIDEO_CONV, num_video_tokens=N, system_prompt="").input_ids
    [(_, stop)] = slot_runs(ids)
    assert not tokens_of(llama, ids[stop : stop + 1])[0].startswith("▁")


@pytest.mark.parametrize("name", ["bpe", "bpe_no_bos", "metaspace", "legacy_llama"])
def test_generation_prompt_is_the_training_prefix(all_tokenizers, name):
    tokenizer = all_tokenizers[name]
    full = tokenize_conversation(tokenizer, VIDEO_CONV, num_video_tokens=N)
    ai_turns = [k for k, t in enumerate(VIDEO_CONV) if t.role == "ai"]
    for k in ai_turns:
        prompt = tokenize_conversation(tokenizer, VIDEO_CONV[:k], num_video_tokens=N, add_generation_prompt=True)
        n = len(prompt)
        np.testing.assert_array_equal(prompt.input_ids, full.input_ids[:n])
        np.testing.assert_array_equal(prompt.labels, full.labels[:n])  # earlier answers stay labelled
        assert prompt.input_ids[-1] != tokenizer.eos_token_id
        # the next training token is the first labelled one: the answer starts right where the prompt stops
        assert full.labels[n - 1] == IGNORE_INDEX and full.labels[n] == full.input_ids[n]
        assert render(VIDEO_CONV[:k], add_generation_prompt=True).endswith(f"{VIDEO_CONV[k - 1].text} ###AI:")


def test_generation_prompt_needs_a_human_last_turn(tok):
    with pytest.raises(ValueError, match="last turn to be human"):
        tokenize_conversation(tok, TEXT_CONV, num_video_tokens=N, add_generation_prompt=True)


# --------------------------------------------------------------------------------------------------------------------
# lengths and arguments
# --------------------------------------------------------------------------------------------------------------------


def test_max_length_is_a_hard_limit_with_a_clear_message(tok):
    n = len(tokenize_conversation(tok, VIDEO_CONV, num_video_tokens=N))
    assert len(tokenize_conversation(tok, VIDEO_CONV, num_video_tokens=N, max_length=n)) == n
    with pytest.raises(ValueError) as info:
        tokenize_conversation(tok, VIDEO_CONV, num_video_tokens=N, max_length=n - 1)
    message = str(info.value)
    assert "conversation is too long" in message and f"{n} tokens" in message and f"max_length={n - 1}" in message
    assert f"1 video(s) x {N} video tokens" in message


def test_argument_errors(tok, tok_dir):
    with pytest.raises(ValueError, match="num_video_tokens"):
        tokenize_conversation(tok, VIDEO_CONV, num_video_tokens=0)
    with pytest.raises(ValueError, match="at least one turn"):
        tokenize_conversation(tok, [], num_video_tokens=N)
    with pytest.raises(ValueError, match="expected a Turn"):
        tokenize_conversation(tok, [("human", "hi")], num_video_tokens=N)
    no_eos = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    with pytest.raises(ValueError, match="no EOS"):
        tokenize_conversation(no_eos, TEXT_CONV, num_video_tokens=N)
    with pytest.raises(ValueError, match="out of range"):
        video_tags(1, 1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(role="user", text="hi"), "role must be one of"),
        (dict(role="human"), "needs non-empty text"),
        (dict(role="ai", text=""), "needs non-empty text"),
        (dict(role="ai", video=0), "only human turns"),
        (dict(role="human", text="look", video=0), "has no text"),
        (dict(role="human", video=-1), "int >= 0"),
        (dict(role="human", video=True), "int >= 0"),
        (dict(role="human", video=1.0), "int >= 0"),
    ],
)
def test_turn_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Turn(**kwargs)


def test_turn_is_frozen():
    turn = Turn("human", "hi")
    with pytest.raises(AttributeError):
        turn.text = "bye"  # type: ignore[misc]


# --------------------------------------------------------------------------------------------------------------------
# pad_batch
# --------------------------------------------------------------------------------------------------------------------


def _conv(ids: list[int], labels: list[int], num_videos: int = 0) -> TokenizedConversation:
    return TokenizedConversation(np.asarray(ids, np.int32), np.asarray(labels, np.int32), num_videos)


def test_pad_batch_right():
    a = _conv([1, 7, -1, -1, 8, 2], [-100, -100, -100, -100, 8, 2], num_videos=1)
    b = _conv([1, 9, 2], [-100, 9, 2])
    out = pad_batch([a, b], pad_id=3)
    assert set(out) == {"input_ids", "labels", "attention_mask", "positions", "adapter_mask", "num_videos"}
    np.testing.assert_array_equal(out["input_ids"], [[1, 7, -1, -1, 8, 2], [1, 9, 2, 3, 3, 3]])
    np.testing.assert_array_equal(out["labels"], [[-100, -100, -100, -100, 8, 2], [-100, 9, 2, -100, -100, -100]])
    np.testing.assert_array_equal(out["attention_mask"], [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 0, 0]])
    np.testing.assert_array_equal(out["num_videos"], [1, 0])
    np.testing.assert_array_equal(out["adapter_mask"], out["attention_mask"])  # video_prefix 0: adapters everywhere
    assert out["input_ids"].dtype == out["labels"].dtype == out["positions"].dtype == np.int32
    assert out["attention_mask"].dtype == np.bool_ and out["num_videos"].dtype == np.int32


def test_pad_batch_left_to_a_fixed_length():
    a = _conv([1, 7, 8], [-100] * 3)
    b = _conv([1, 9], [-100] * 2)
    out = pad_batch([a, b], pad_id=0, length=5, side="left")
    np.testing.assert_array_equal(out["input_ids"], [[0, 0, 1, 7, 8], [0, 0, 0, 1, 9]])
    np.testing.assert_array_equal(out["labels"], np.full((2, 5), IGNORE_INDEX))
    np.testing.assert_array_equal(out["attention_mask"], [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(out["positions"], [[0, 0, 0, 1, 2], [0, 0, 0, 0, 1]])
    assert (out["input_ids"][:, -1] == [8, 9]).all()  # every row ends at the last column, ready to generate


def test_pad_batch_errors(tok):
    conv = tokenize_conversation(tok, VIDEO_CONV, num_video_tokens=N)
    with pytest.raises(ValueError, match=rf"conversation 1 has {len(conv)} tokens, more than the batch length 4"):
        pad_batch([_conv([1, 2], [-100, 2]), conv], pad_id=3, length=4)
    with pytest.raises(ValueError, match="side"):
        pad_batch([conv], pad_id=3, side="middle")
    with pytest.raises(ValueError, match="pad_id"):
        pad_batch([conv], pad_id=VIDEO_PLACEHOLDER_ID)
    with pytest.raises(ValueError, match="at least one"):
        pad_batch([], pad_id=3)


def test_pad_batch_of_real_conversations(tok):
    convs = [tokenize_conversation(tok, t, num_video_tokens=N) for t in (VIDEO_CONV, THREE_VIDEOS, TEXT_CONV)]
    out = pad_batch(convs, pad_id=tok.pad_token_id)
    lengths = [len(c) for c in convs]
    np.testing.assert_array_equal(out["attention_mask"].sum(1), lengths)
    np.testing.assert_array_equal(out["positions"].max(1), np.asarray(lengths) - 1)
    np.testing.assert_array_equal((out["input_ids"] == VIDEO_PLACEHOLDER_ID).sum(1), out["num_videos"] * N)


# --------------------------------------------------------------------------------------------------------------------
# tokenizer.py
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox.",
        "  leading and trailing spaces, tabs\tand\nnewlines  ",
        "Grüße aus Köln, naïve café, 日本語のテキスト, emoji 🎥🐈 and Ωμέγα",
        "###Human: <video></video> ###AI: ok</s>",  # the EOS *text* is a special token and must survive
    ],
)
def test_bpe_round_trip(tok, text):
    ids = enc(tok, text)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, clean_up_tokenization_spaces=False) == text


def test_bpe_special_ids_and_no_automatic_specials(tok):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert list(tok.encode("hi", add_special_tokens=True)) == enc(tok, "hi")  # BOS/EOS are the template's job
    assert len(tok) <= 512  # at most vocab_size: a small corpus runs out of merges first


def test_build_bpe_is_deterministic_and_keeps_extra_tokens(tmp_path):
    texts = CORPUS * 2
    a = build_bpe_tokenizer(texts, tmp_path / "a", vocab_size=400, extra_tokens=["<obj>", "<scene>"])
    b = build_bpe_tokenizer(texts, tmp_path / "b", vocab_size=400, extra_tokens=["<obj>", "<scene>"])
    assert json.loads((tmp_path / "a" / "tokenizer.json").read_text()) == json.loads(
        (tmp_path / "b" / "tokenizer.json").read_text()
    )
    sample = "A <obj> in a <scene>, naïve."
    assert enc(a, sample) == enc(b, sample)
    assert a.convert_tokens_to_ids(["<obj>", "<scene>"]) == [4, 5]
    assert [4, 5] == [i for i in enc(a, sample) if i in (4, 5)]  # atomic
    assert a.decode(enc(a, sample), skip_special_tokens=True) == sample  # not special: kept
    with pytest.raises(ValueError, match="extra_tokens"):
        build_bpe_tokenizer(texts, tmp_path / "c", extra_tokens=["</s>"])
    with pytest.raises(ValueError, match="vocab_size"):
        build_bpe_tokenizer(texts, tmp_path / "d", vocab_size=100)


def test_load_tokenizer_errors_name_the_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*no tokenizer files"):
        load_tokenizer(empty)
    with pytest.raises(FileNotFoundError, match=r"missing.*does not exist"):
        load_tokenizer(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises((ValueError, OSError), match="broken"):
        load_tokenizer(broken)


# --------------------------------------------------------------------------------------------------------------------
# rows in the LLM's own chat template
# --------------------------------------------------------------------------------------------------------------------

# ChatML with a default system prompt, as SmolLM2-Instruct's tokenizer writes it
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chatml_tok(tok_dir):
    chat = load_tokenizer(tok_dir)
    chat.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chat.chat_template = CHATML
    return chat


def test_a_row_in_the_llm_template_is_its_rendering_with_labels_on_the_assistant_messages(chatml_tok):
    turns = (Turn("human", "Describe the scene."), Turn("ai", "A red square moves."), Turn("human", "And then?"),
             Turn("ai", "It stops."))
    conv = tokenize_in_llm_template(chatml_tok, turns)
    messages = [{"role": "user" if t.role == "human" else "assistant", "content": t.text} for t in turns]
    assert conv.num_videos == 0 and conv.video_prefix == 0
    assert chatml_tok.decode(conv.input_ids) == chatml_tok.apply_chat_template(messages, tokenize=False)
    labelled = conv.labels != IGNORE_INDEX
    np.testing.assert_array_equal(conv.labels[labelled], conv.input_ids[labelled])
    # exactly the two answers, each with the template's end of turn, and nothing of the prompts
    spans = np.flatnonzero(np.diff(np.concatenate([[0], labelled.astype(int), [0]])))
    texts = [chatml_tok.decode(conv.input_ids[a:b]) for a, b in zip(spans[::2], spans[1::2])]
    assert texts == ["A red square moves.<|im_end|>\n", "It stops.<|im_end|>\n"]
    # what the model reads before its first answer is the generation prompt inference gives it
    prompt = chatml_tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert chatml_tok.decode(conv.input_ids[: spans[0]]) == prompt


def test_a_row_in_the_llm_template_refuses_what_it_cannot_label(chatml_tok, tok):
    with pytest.raises(ValueError, match="has no chat template"):
        tokenize_in_llm_template(tok, TEXT_CONV)
    with pytest.raises(ValueError, match="text only"):
        tokenize_in_llm_template(chatml_tok, VIDEO_CONV)
    with pytest.raises(ValueError, match="too long: .* > max_length=5"):
        tokenize_in_llm_template(chatml_tok, TEXT_CONV, max_length=5)
    # a template that writes the last message unlike the same message followed by more: the answer's borders move
    odd = copy.deepcopy(chatml_tok)
    odd.chat_template = CHATML.replace("'<|im_end|>' + '\n'", "('<|im_end|>' if loop.last else '<|im_end|>\n')")
    with pytest.raises(ValueError, match="continuation of the messages before it"):
        tokenize_in_llm_template(odd, TEXT_CONV + (Turn("human", "More?"), Turn("ai", "No.")))


def test_the_chat_template_travels_with_the_tokenizer_files(chatml_tok, tmp_path):
    """A trained model's folder gets its tokenizer by ``copy_tokenizer_files``; an instruct LLM's chat template (its
    own file in transformers' folders) must come along, or rows and requests in it fail after the first copy."""
    from g4v_jax.data.tokenizer import copy_tokenizer_files

    chatml_tok.save_pretrained(tmp_path / "llm")
    (tmp_path / "model").mkdir()
    copied = copy_tokenizer_files(tmp_path / "llm", tmp_path / "model")
    assert any(name.startswith("chat_template") for name in copied)
    again = load_tokenizer(tmp_path / "model")
    assert again.chat_template == CHATML
    turns = (Turn("human", "Describe the scene."), Turn("ai", "A red square moves."))
    np.testing.assert_array_equal(tokenize_in_llm_template(again, turns).labels,
                                  tokenize_in_llm_template(chatml_tok, turns).labels)
