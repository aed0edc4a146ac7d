"""The streaming decoder against a brute-force reference, with Hypothesis: whatever the tokens and stop strings, the
streamed pieces concatenate to the final answer, nothing streamed is ever taken back, and the held tail is the one
the definition gives (the KMP matcher is linear in the stop's length; the old regex of every prefix was quadratic)."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from g4v_jax.inference.text import StreamDecoder, clean_answer, prefix_function, stop_prefix_at_end

ALPHABET = "ab# \n"


class CharTokenizer:
    """Token i is the i-th piece of a small vocabulary (decode = concatenation)."""

    vocab = ["a", "b", "#", " ", "\n", "##", " #", "ab", "###"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.vocab[i] for i in ids)


def _reference_prefix_at_end(text: str, stop: str) -> int:
    return max((k for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)


@given(st.text(ALPHABET, max_size=40), st.text(ALPHABET, min_size=1, max_size=12))
def test_the_held_tail_is_the_longest_end_that_begins_a_stop(text, stop):
    assert stop_prefix_at_end(text, stop, prefix_function(stop)) == _reference_prefix_at_end(text, stop)


@settings(max_examples=300)
@given(st.lists(st.integers(0, len(CharTokenizer.vocab) - 1), max_size=30),
       st.lists(st.text(ALPHABET, min_size=1, max_size=6), max_size=4))
@example(ids=[6, 2], stops=[" ##"])  # " #" then "#": the answer before the stop is empty, "#" was streamed
def test_streamed_pieces_are_the_answer_and_never_taken_back(ids, stops):
    tok = CharTokenizer()
    dec = StreamDecoder(tok, stops=stops or ("###",))
    pieces = []
    for i in ids:
        pieces.append(dec.push(i))
        # what was streamed is a prefix of every answer this text can still become (here: the answer if it ended now)
        assert dec.answer.startswith("".join(pieces)) or dec.stopped
        if dec.stopped:
            break
    pieces.append(dec.finish())
    assert "".join(pieces) == clean_answer(dec.text, dec.stops)


def test_a_long_stop_string_costs_a_pass_over_its_own_length():
    stop = "x" * 4000 + "y"
    dec = StreamDecoder(CharTokenizer(), stops=(stop,))
    pieces = [dec.push(0) for _ in range(300)] + [dec.finish()]
    assert "".join(pieces) == "a" * 300
