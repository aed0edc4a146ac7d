"""What-the-LLM-kept measures: perplexity from logits, and the comparison against the thresholds."""

import math

import numpy as np

from g4v_jax.world.kept import GENERAL_PROMPTS, KEPT_THRESHOLDS, compare, perplexity_from_logits


def test_perplexity_counts_every_predicted_token_of_each_row_and_no_pad():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 5))
    ids = np.array([[1, 2, 3, 4], [0, 4, 2, 0]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], bool)
    nll = []
    for b, n in ((0, 4), (1, 3)):
        for t in range(1, n):
            row = logits[b, t - 1]
            nll.append(-(row[ids[b, t]] - math.log(np.exp(row).sum())))
    assert abs(perplexity_from_logits(logits, ids, mask) - math.exp(np.mean(nll))) < 1e-12


def _run(ppl, answers, tokens=None):
    return {"perplexity": ppl, "answers": answers, "tokens": tokens or [[len(a)] for a in answers]}


def test_kept_holds_the_thresholds_and_counts_lost_answers():
    right = [k.split("|")[0] for _, k in GENERAL_PROMPTS]
    before = _run(20.0, right)
    same = compare(before, _run(20.0 * (1 + KEPT_THRESHOLDS["perplexity_rise"]) - 1e-9, right))
    assert same["kept"] and same["answers_lost"] == 0 and same["answers_unchanged"] == len(right)
    worse = compare(before, _run(20.0 * 1.2, right))
    assert not worse["kept"] and abs(worse["perplexity_rise"] - 0.2) < 1e-12
    two_lost = compare(before, _run(20.0, ["no idea", "no idea", *right[2:]]))
    assert two_lost["answers_lost"] == 2 and not two_lost["kept"]
    # an answer the base model got wrong cannot be lost
    base_wrong = compare(_run(20.0, ["no idea", *right[1:]]), _run(20.0, ["still no", *right[1:]]))
    assert base_wrong["answers_lost"] == 0 and base_wrong["kept"]
