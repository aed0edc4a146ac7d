"""The jitted generation engine against repeated full forwards, HF generate, batch composition and sampling rules."""

import jax
import numpy as np
import pytest
from flax import nnx

from g4v_jax.inference.generate import SamplingConfig, bucket_length, filter_logits, generate

torch = pytest.importorskip("torch")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB = 96


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from g4v_jax.convert.hf_llama import load_hf_llama

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    path = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(path)
    _, ours = load_hf_llama(path)
    return hf, ours


def _left_pad(rows, length):
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = True
    return {"input_ids": ids, "attention_mask": mask}


PROMPTS = [np.random.default_rng(i).integers(3, VOCAB, n).astype(np.int32) for i, n in enumerate((7, 12, 4))]


def test_greedy_with_cache_equals_argmax_of_full_forwards(models):
    _, ours = models
    n_new = 10
    res = generate(ours, _left_pad(PROMPTS[:1], 7), SamplingConfig(max_new_tokens=n_new), eos_id=-1)
    seq = list(PROMPTS[0])
    forward = nnx.jit(lambda m, x: m(x)[0])
    for _ in range(n_new):
        seq.append(int(np.argmax(np.asarray(forward(ours, np.array([seq])))[0, -1])))
    assert res.tokens[0].tolist() == seq[7:]
    assert res.lengths[0] == n_new


def test_greedy_equals_hf_generate(models):
    hf, ours = models
    batch = _left_pad(PROMPTS, 12)
    res = generate(ours, batch, SamplingConfig(max_new_tokens=12), eos_id=2, pad_id=0)
    with torch.no_grad():
        ref = hf.generate(torch.from_numpy(batch["input_ids"]).long(),
                          attention_mask=torch.from_numpy(batch["attention_mask"]).long(), max_new_tokens=12,
                          do_sample=False, pad_token_id=0, eos_token_id=2)[:, 12:].numpy()
    for i in range(3):
        n = res.lengths[i]
        assert res.tokens[i, :n].tolist() == ref[i, :n].tolist(), i


def test_batch_invariance(models):
    _, ours = models
    cfg = SamplingConfig(max_new_tokens=8)
    together = generate(ours, _left_pad(PROMPTS, 16), cfg, eos_id=-1)
    for i, p in enumerate(PROMPTS):
        alone = generate(ours, _left_pad([p], 16), cfg, eos_id=-1)
        assert together.tokens[i].tolist() == alone.tokens[0].tolist(), i


def test_stops_at_eos_and_stop_sequences(models):
    _, ours = models
    free = generate(ours, _left_pad(PROMPTS[:1], 7), SamplingConfig(max_new_tokens=8), eos_id=-1)
    t = free.tokens[0]
    as_eos = generate(ours, _left_pad(PROMPTS[:1], 7), SamplingConfig(max_new_tokens=8), eos_id=int(t[2]), pad_id=0)
    first = int(np.flatnonzero(t == t[2])[0])
    assert as_eos.lengths[0] == first + 1 and (as_eos.tokens[0, first + 1:] == 0).all()
    seq = (int(t[3]), int(t[4]))
    stopped = generate(ours, _left_pad(PROMPTS[:1], 7), SamplingConfig(max_new_tokens=8, stop_sequences=(seq,)),
                       eos_id=-1)
    assert stopped.tokens[0, :stopped.lengths[0]].tolist()[-2:] == list(seq) and stopped.lengths[0] <= 5


def test_sampling_is_reproducible_and_respects_top_k_top_p(models):
    _, ours = models
    batch = _left_pad(PROMPTS, 12)
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, top_k=5)
    a = generate(ours, batch, cfg, key=jax.random.key(7), eos_id=-1)
    b = generate(ours, batch, cfg, key=jax.random.key(7), eos_id=-1)
    c = generate(ours, batch, cfg, key=jax.random.key(8), eos_id=-1)
    assert (a.tokens == b.tokens).all() and (a.tokens != c.tokens).any()
    logits = jax.random.normal(jax.random.key(0), (4, VOCAB))
    for top_k, top_p in ((5, 1.0), (0, 0.5), (3, 0.3)):
        allowed = np.asarray(filter_logits(logits, top_k, top_p)) > -1e29
        probs = np.asarray(jax.nn.softmax(logits))
        order = np.argsort(-probs, axis=-1)
        for row in range(4):
            kept = allowed[row]
            if top_k:
                assert set(np.flatnonzero(kept)) <= set(order[row, :top_k])
            if top_p < 1:
                mass_before = np.cumsum(probs[row, order[row]]) - probs[row, order[row]]
                assert set(np.flatnonzero(kept)) <= set(order[row, mass_before < top_p])
            assert kept[order[row, 0]]  # the most likely token always survives
        samples = jax.random.categorical(jax.random.key(1), filter_logits(logits, top_k, top_p), shape=(500, 4))
        assert allowed[np.arange(4)[None, :], np.asarray(samples)].all()


def test_bucket_length_and_context_errors(models):
    _, ours = models
    assert [bucket_length(n) for n in (1, 64, 65, 200)] == [64, 64, 128, 256]
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        generate(ours, _left_pad(PROMPTS[:1], 250), SamplingConfig(max_new_tokens=10), eos_id=2)
    right = _left_pad(PROMPTS[:1], 9)
    right = {k: v[:, ::-1].copy() for k, v in right.items()}
    with pytest.raises(ValueError, match="left-padded"):
        generate(ours, right, SamplingConfig(max_new_tokens=4), eos_id=2)


def test_stream_yields_the_tokens_generate_returns(models):
    from g4v_jax.inference.generate import stream

    _, ours = models
    batch = _left_pad(PROMPTS, 12)
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.8, top_p=0.9)
    full = generate(ours, batch, cfg, key=jax.random.key(3), eos_id=-1)
    steps = np.stack(list(stream(ours, batch, cfg, key=jax.random.key(3), eos_id=-1)), axis=1)
    assert steps.tolist() == full.tokens.tolist()


def test_video_prompt_greedy_equals_argmax_of_full_forwards():
    """GPT4Video: vision tower + abstractor run inside the prefill; decoding continues from the spliced prompt."""
    from g4v_jax.config import load_config
    from g4v_jax.models.gpt4video import build_model

    cfg = load_config("tiny").model
    model = build_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    k = cfg.num_video_tokens
    ids = rng.integers(3, cfg.llm.vocab_size, (1, 24)).astype(np.int32)
    ids[0, 3:3 + k] = -1
    videos = rng.integers(0, 256, (1, 1, cfg.num_frames, 56, 56, 3), dtype=np.uint8)
    fmask = np.ones((1, 1, cfg.num_frames), bool)
    batch = {"input_ids": ids, "attention_mask": np.ones((1, 24), bool), "videos": videos, "frame_mask": fmask}
    res = generate(model, batch, SamplingConfig(max_new_tokens=5), eos_id=-1)
    seq = ids
    forward = nnx.jit(lambda m, x, v, f: m(x, videos=v, frame_mask=f)[0])
    for _ in range(5):
        nxt = int(np.argmax(np.asarray(forward(model, seq, videos, fmask))[0, -1]))
        seq = np.concatenate([seq, [[nxt]]], axis=1).astype(np.int32)
    assert res.tokens[0].tolist() == seq[0, 24:].tolist()
