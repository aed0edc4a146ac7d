import pytest

from g4v_jax.safety.refusal import POLITE_REFUSAL, is_refusal


@pytest.mark.parametrize("answer", [
    "I'm sorry, but I cannot create a video of that.",
    "I\u2019m sorry, I can\u2019t help with that request.",  # curly apostrophes
    "I cannot generate violent content.",
    "Sorry, I can't assist with this request.",
    "That is not appropriate, so I will not make that video.",
    "I must decline: this goes against my guidelines.",
    "I am unable to describe this video.",
    POLITE_REFUSAL,
])
def test_refusals(answer):
    assert is_refusal(answer)


@pytest.mark.parametrize("answer", [
    "A man dances energetically on a stage. <video>a man dancing on a stage</video>",
    "Sure! Here is a video of a cat: <video>a cat playing</video>",
    "",
    "   ",
    "The video shows a red square. " * 20 + "I cannot tell which way it moves.",  # a late "cannot" is no refusal
    "The team cannot assist the goalkeeper in time, and the ball goes in.",
])
def test_not_refusals(answer):
    assert not is_refusal(answer)


def test_the_judge_is_asked_only_when_phrases_find_nothing():
    calls = []

    def judge(text):
        calls.append(text)
        return True

    assert is_refusal("I'm sorry, I cannot.", judge=judge) and calls == []
    assert is_refusal("Let's talk about something else.", judge=judge) and len(calls) == 1
    assert not is_refusal("Let's talk about something else.")
