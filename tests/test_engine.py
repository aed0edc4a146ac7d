"""The continuous-batching engine: requests that arrive at random steps into fewer slots than requests give the
tokens ``generate`` gives each alone (greedy), seeded sampling independent of neighbours and slot, cancellation,
no recompilation at steady state, refusals per request, streaming text."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import jax

from g4v_jax.config import EngineConfig, load_config
from g4v_jax.inference.engine import Engine, EngineRequest, RequestError, sample_rows
from g4v_jax.inference.generate import SamplingConfig, filter_logits, generate
from g4v_jax.models.gpt4video import build_model

T, S = 4, 56


@pytest.fixture(scope="module")
def model():
    return build_model(load_config("tiny").model)


def _prompt(rng, n_text: int, n_videos: int, k: int) -> np.ndarray:
    parts: list[int] = []
    for _ in range(n_videos):
        parts += [int(x) for x in rng.integers(3, 500, 3)] + [-1] * k
    parts += [int(x) for x in rng.integers(3, 500, n_text)]
    return np.array(parts, np.int32)


def _clip(rng, masked: int = 0):
    mask = np.ones(T, bool)
    mask[T - masked:] = False
    return rng.integers(0, 255, (T, S, S, 3), dtype=np.uint8), mask


def _requests(model, n: int, seed: int = 0, **sampling) -> list[EngineRequest]:
    """``n`` requests: prompts of 2-70 text tokens, a third with one video and a sixth with two, budgets 1-14."""
    rng = np.random.default_rng(seed)
    k = model.cfg.num_video_tokens
    out = []
    for i in range(n):
        nv = 2 if i % 6 == 5 else 1 if i % 3 == 1 else 0
        prompt = _prompt(rng, int(rng.integers(2, 70)), nv, k)
        clips = [_clip(rng, masked=int(rng.integers(0, 2))) for _ in range(nv)]
        budget = int(rng.choice([1, 6, 14]))  # few budgets: the reference ``generate`` compiles per budget
        out.append(EngineRequest(prompt, clips, SamplingConfig(budget, **sampling), id=i))
    return out


def _alone(model, req: EngineRequest, eos_id: int) -> list[int]:
    """``generate`` on the request by itself (left-padded to its bucket): the reference."""
    ids = req.prompt_ids
    length = 1 << max(6, (len(ids) - 1).bit_length())
    batch = {"input_ids": np.zeros((1, length), np.int32), "attention_mask": np.zeros((1, length), bool)}
    batch["input_ids"][0, length - len(ids):] = ids
    batch["attention_mask"][0, length - len(ids):] = True
    if req.videos:
        batch["videos"] = np.stack([f for f, _ in req.videos])[None]
        batch["frame_mask"] = np.stack([m for _, m in req.videos])[None]
    out = generate(model, batch, req.sampling, eos_id=eos_id)
    return out.tokens[0, :out.lengths[0]].tolist()


def _drive(engine: Engine, requests, arrivals, cancel_at=None):
    """Submit request i at round ``arrivals[i]``; optionally cancel request c at round r (``cancel_at=(c, r)``)."""
    handles: dict[int, object] = {}
    rnd = 0
    while len(handles) < len(requests) or engine.busy:
        for i, r in enumerate(requests):
            if arrivals[i] == rnd:
                handles[i] = engine.submit(r)
        if cancel_at is not None and cancel_at[1] == rnd:
            handles[cancel_at[0]].cancel()
        engine.run_once()
        rnd += 1
        assert rnd < 1000
    return [handles[i].result(timeout=0) for i in range(len(requests))]


def test_greedy_requests_arriving_at_random_steps_equal_generate_alone(model):
    requests = _requests(model, 24)
    # an EOS that the outputs actually produce mid-answer, so that EOS, budgets and stop sequences all end requests;
    # one token-level stop sequence too
    free_engine = Engine(model, None, EngineConfig(num_slots=8, max_length=160, min_bucket=16), eos_id=-1)
    free_handles = [free_engine.submit(r) for r in requests]
    free_engine.run()
    free = [h.result().tokens for h in free_handles]
    counts = np.bincount([t for toks in free for t in toks[1:-1]], minlength=512)
    eos = int(np.argmax(counts))
    stop = (free[3][1], free[3][2]) if len(free[3]) > 2 else (7, 7)
    requests = [EngineRequest(r.prompt_ids, r.videos, SamplingConfig(r.sampling.max_new_tokens,
                                                                      stop_sequences=(stop,)), id=r.id)
                for r in requests]
    engine = Engine(model, None, EngineConfig(num_slots=4, max_length=160, min_bucket=16), eos_id=eos)
    arrivals = np.sort(np.random.default_rng(1).integers(0, 30, len(requests)))
    results = _drive(engine, requests, arrivals)
    reasons = set()
    for r, res in zip(requests, results):
        assert res.tokens == _alone(model, r, eos_id=eos), r.id
        assert len(res.token_times) == len(res.tokens) and res.ttft >= 0
        reasons.add(res.finish_reason)
    assert reasons == {"eos", "stop", "length"}
    assert engine.stats.steps < sum(len(r.tokens) for r in results)  # slots really were shared
    assert engine.free_slots() == 4 and not engine.queue


def test_seeded_sampling_does_not_depend_on_neighbours_or_slot(model):
    target = _requests(model, 2, seed=5, temperature=0.9, top_k=40, top_p=0.9)[1]
    target = EngineRequest(target.prompt_ids, target.videos, SamplingConfig(14, temperature=0.9, top_k=40, top_p=0.9),
                           seed=1234, id="target")
    alone = Engine(model, None, EngineConfig(num_slots=4, max_length=160, min_bucket=16), eos_id=-1)
    h = alone.submit(target)
    alone.run()
    first = h.result().tokens
    assert len(first) == 14
    # among greedy and sampled neighbours, arriving later, in another slot
    others = _requests(model, 6, seed=9, temperature=0.7)
    busy = Engine(model, None, EngineConfig(num_slots=4, max_length=160, min_bucket=16), eos_id=-1)
    results = _drive(busy, others[:3] + [target] + others[3:], [0, 0, 1, 3, 4, 4, 5])
    assert results[3].tokens == first
    # a different seed samples something else
    other_seed = Engine(model, None, EngineConfig(num_slots=4, max_length=160, min_bucket=16), eos_id=-1)
    h2 = other_seed.submit(EngineRequest(target.prompt_ids, target.videos, target.sampling, seed=99))
    other_seed.run()
    assert h2.result().tokens != first


def test_cancel_frees_the_slot_and_leaves_neighbours_alone(model):
    requests = [EngineRequest(r.prompt_ids, r.videos, SamplingConfig(12), id=r.id) for r in _requests(model, 6, 3)]
    cfg = EngineConfig(num_slots=2, max_length=160, min_bucket=16)
    plain = _drive(Engine(model, None, cfg, eos_id=-1), requests, [0] * 6)
    engine = Engine(model, None, cfg, eos_id=-1)
    cut = _drive(engine, requests, [0] * 6, cancel_at=(1, 3))
    assert cut[1].finish_reason == "cancelled" and 0 < len(cut[1].tokens) < 12
    assert cut[1].tokens == plain[1].tokens[:len(cut[1].tokens)]
    for i in (0, 2, 3, 4, 5):
        assert cut[i].tokens == plain[i].tokens, i
    # the freed slot was refilled at once: request 2 started before request 0 finished
    assert cut[2].token_times[0] < cut[0].token_times[-1]
    # a request cancelled while still queued never runs
    engine = Engine(model, None, EngineConfig(num_slots=1, max_length=160, min_bucket=16), eos_id=-1)
    first, queued = engine.submit(requests[0]), engine.submit(requests[1])
    queued.cancel()
    engine.run()
    assert queued.result().finish_reason == "cancelled" and queued.result().tokens == []
    assert first.result().tokens == plain[0].tokens


def test_steady_state_compiles_nothing(model):
    seen = []

    def listen(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(duration)

    # random prompts, but a chance first-token match would prefill one token less, maybe in a smaller bucket: the
    # prefix cache's own no-compile check is test_prefix_cache_*
    engine = Engine(model, None, EngineConfig(num_slots=3, max_length=160, min_bucket=16, prefix_cache=False),
                    eos_id=-1)
    before = dict(engine.programs.traces)  # programs are shared per model; other tests compiled other slot counts
    warm = _requests(model, 12, seed=11)
    _drive(engine, warm, np.arange(12) // 2)
    traces = dict(engine.programs.traces)
    new = {name: n - before.get(name, 0) for name, n in traces.items() if n != before.get(name, 0)}
    assert new.get("step") == 1
    assert all(n == 1 for n in new.values()), new  # one program per bucket / video count
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        # new requests with other prompts, budgets and arrival pattern, in the same buckets
        fresh = [r for r in _requests(model, 30, seed=12)
                 if f"extend[{engine._bucket(len(r.prompt_ids))} tokens]" in new][:12]
        assert len(fresh) >= 8
        _drive(engine, fresh, np.random.default_rng(2).integers(0, 10, len(fresh)))
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert dict(engine.programs.traces) == traces
    assert seen == []


# --------------------------------------------------------------------------------------------------------------------
# Prefix cache, video cache, chunked prefill
# --------------------------------------------------------------------------------------------------------------------


def _conversations(model, users: int, turns: int, seed: int = 0, shared: bool = False):
    """Per user: a first prompt (a system text, one video, a question) and later questions; each next prompt is the
    last prompt + the model's answer + the next question, as a chat client resends it. ``shared``: every user has
    the same system text and video (concurrent requests sharing a prefix)."""
    rng = np.random.default_rng(seed)
    k = model.cfg.num_video_tokens
    system = [int(x) for x in rng.integers(3, 500, 12)]
    video = _clip(rng)
    out = []
    for _ in range(users):
        own_system = system if shared else [int(x) for x in rng.integers(3, 500, 12)]
        own_video = video if shared else _clip(rng)
        first = np.array(own_system + [-1] * k + [int(x) for x in rng.integers(3, 500, 6)], np.int32)
        questions = [[int(x) for x in rng.integers(3, 500, int(rng.integers(3, 9)))] for _ in range(turns - 1)]
        out.append((first, own_video, questions))
    return out


def _chat(engine: Engine, conversations, budget: int = 6, together: bool = True) -> list[list[list[int]]]:
    """Every user's turns through ``engine``: the tokens of every answer. ``together``: each turn of all users is
    submitted at once; else user after user, each conversation from its first turn to its last."""
    prompts = [first for first, _, _ in conversations]
    answers: list[list[list[int]]] = [[] for _ in conversations]
    turns = 1 + len(conversations[0][2])

    def request(u: int, t: int) -> EngineRequest:
        _, video, questions = conversations[u]
        if t:
            prompts[u] = np.concatenate([prompts[u], answers[u][-1], questions[t - 1]]).astype(np.int32)
        return EngineRequest(prompts[u], [video], SamplingConfig(budget), id=(u, t))

    order = ([[(u, t) for u in range(len(conversations))] for t in range(turns)] if together
             else [[(u, t)] for u in range(len(conversations)) for t in range(turns)])
    for group in order:
        handles = [(u, engine.submit(request(u, t))) for u, t in group]
        engine.run()
        for u, h in handles:
            answers[u].append(h.result().tokens)
    return answers


def test_prefix_cache_gives_the_tokens_of_a_cold_engine_with_videos_and_evictions(model):
    """Five users, four turns each, over two slots: every turn after the first finds its conversation's prefix
    (the video matched by content) unless another user's turn evicted it; greedy tokens equal a cold engine's."""
    conversations = _conversations(model, users=5, turns=4, seed=1)
    cfg = EngineConfig(num_slots=2, max_length=256, min_bucket=16)
    cold = Engine(model, None, dataclasses.replace(cfg, prefix_cache=False, video_cache_mb=0), eos_id=-1)
    warm = Engine(model, None, cfg, eos_id=-1)
    by_user = _chat(warm, conversations, together=False)
    assert by_user == _chat(cold, conversations, together=False)
    # user by user: each user's later turns find the previous turn in the slot it left
    assert warm.stats.prefix_hit_tokens > 0.7 * (warm.stats.prefix_hit_tokens + warm.stats.prefill_tokens)
    assert warm.stats.encoded_videos == 5 and cold.stats.encoded_videos == 20
    # all users each turn: five conversations over two slots evict each other; still the same tokens
    warm = Engine(model, None, cfg, eos_id=-1)
    assert _chat(warm, conversations) == by_user
    assert warm.stats.video_cache_hits > 0


def test_concurrent_requests_share_a_running_requests_prefix(model):
    """Four users with the same system text and video at once: the first request's prefix is copied into the
    others' slots instead of computed again; tokens equal a cold engine's."""
    conversations = _conversations(model, users=4, turns=2, seed=2, shared=True)
    cfg = EngineConfig(num_slots=4, max_length=256, min_bucket=16)
    warm = Engine(model, None, cfg, eos_id=-1)
    got = _chat(warm, conversations)
    cold = Engine(model, None, dataclasses.replace(cfg, prefix_cache=False), eos_id=-1)
    assert got == _chat(cold, conversations)
    k = model.cfg.num_video_tokens
    assert warm.stats.prefix_hit_tokens >= 3 * (12 + k)  # turn 1: three users share the first one's system + video


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(model):
    """A 150-token prompt in chunks of 16 while another request decodes: the running request gets tokens between
    the chunks, and both get the tokens they get alone."""
    rng = np.random.default_rng(3)
    short = EngineRequest(_prompt(rng, 10, 0, model.cfg.num_video_tokens), (), SamplingConfig(40), id="short")
    long = EngineRequest(_prompt(rng, 150, 0, model.cfg.num_video_tokens), (), SamplingConfig(5), id="long")
    cfg = EngineConfig(num_slots=2, max_length=256, min_bucket=16, prefill_chunk=16)
    alone = {r.id: _drive(Engine(model, None, cfg, eos_id=-1), [r], [0])[0].tokens for r in (short, long)}
    engine = Engine(model, None, cfg, eos_id=-1)
    out = _drive(engine, [short, long], [0, 3])
    assert [o.tokens for o in out] == [alone["short"], alone["long"]]
    between = [t for t in out[0].token_times if out[1].submitted < t < out[1].token_times[0]]
    assert len(between) >= 150 // 16 - 1  # a decode step after every chunk
    # whole prompt at once: the running request waits for all of it
    engine = Engine(model, None, dataclasses.replace(cfg, prefill_chunk=256), eos_id=-1)
    out = _drive(engine, [short, long], [0, 3])
    assert [t for t in out[0].token_times if out[1].submitted < t < out[1].token_times[0]] == []


def test_prefix_cache_workloads_compile_nothing_after_warmup(model):
    seen = []

    def listen(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(duration)

    engine = Engine(model, None, EngineConfig(num_slots=2, max_length=256, min_bucket=16, prefill_chunk=64),
                    eos_id=-1)
    engine.warmup()
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        _chat(engine, _conversations(model, users=3, turns=3, seed=4))
        _chat(engine, _conversations(model, users=3, turns=2, seed=5, shared=True))
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert seen == [] and engine.stats.prefix_hit_tokens > 0


def test_a_failed_scheduling_round_drops_every_retained_prefix(model):
    """``serve_forever`` survives a round that raises: the requests in it fail, the decode state is fresh, and no
    slot claims a prefix the fresh cache no longer holds (the next turn gets a cold engine's tokens)."""
    import threading

    (first, video, questions), = _conversations(model, users=1, turns=2, seed=6)
    cfg = EngineConfig(num_slots=2, max_length=256, min_bucket=16)
    engine = Engine(model, None, cfg, eos_id=-1)
    stop = threading.Event()
    thread = threading.Thread(target=engine.serve_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        answer = engine.submit(EngineRequest(first, [video], SamplingConfig(6))).result(timeout=120).tokens
        assert any(r is not None for r in engine.retained)
        real = engine._prefill_round
        calls = []

        def broken():
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("a bug in the loop")
            return real()

        engine._prefill_round = broken
        second = np.concatenate([first, answer, questions[0]]).astype(np.int32)
        failed = engine.submit(EngineRequest(second, [video], SamplingConfig(6))).result(timeout=120)
        assert failed.finish_reason == "error" and all(r is None for r in engine.retained)
        again = engine.submit(EngineRequest(second, [video], SamplingConfig(6))).result(timeout=120)
    finally:
        engine.close(stop)
        thread.join(timeout=30)
    cold = Engine(model, None, dataclasses.replace(cfg, prefix_cache=False), eos_id=-1)
    h = cold.submit(EngineRequest(second, [video], SamplingConfig(6)))
    cold.run()
    assert again.tokens == h.result().tokens and again.finish_reason == "length"


def test_requests_that_cannot_fit_are_refused_alone(model):
    engine = Engine(model, None, EngineConfig(num_slots=2, max_length=64, max_videos=1, max_queue=3), eos_id=-1)
    k = model.cfg.num_video_tokens
    rng = np.random.default_rng(0)
    ok = EngineRequest(_prompt(rng, 10, 0, k), (), SamplingConfig(8))
    with pytest.raises(RequestError, match="prompt of 60 tokens \\+ max_new_tokens=8 does not fit engine.max_length "
                                           "of 64"):
        engine.submit(EngineRequest(_prompt(rng, 60, 0, k), (), SamplingConfig(8)))
    with pytest.raises(RequestError, match="2 videos in one request; this engine takes at most 1"):
        engine.submit(EngineRequest(_prompt(rng, 5, 2, k), [_clip(rng), _clip(rng)], SamplingConfig(4)))
    with pytest.raises(RequestError, match="video slots but 0 videos"):
        engine.submit(EngineRequest(_prompt(rng, 5, 1, k), (), SamplingConfig(4)))
    with pytest.raises(RequestError, match=r"video 0 has frames uint8 \(4, 32, 32, 3\).*reads uint8 frames "
                                           r"\(4, 56, 56, 3\)"):
        engine.submit(EngineRequest(_prompt(rng, 5, 1, k), [(np.zeros((4, 32, 32, 3), np.uint8), np.ones(4, bool))],
                                    SamplingConfig(4)))
    with pytest.raises(RequestError, match="outside the model's vocabulary of 512"):
        engine.submit(EngineRequest(np.array([3, 900], np.int32), (), SamplingConfig(4)))
    handles = [engine.submit(ok) for _ in range(5)]  # 2 slots + 3 queued
    with pytest.raises(RequestError, match="queue is full"):
        engine.submit(ok)
    engine.run()
    assert all(h.result().finish_reason == "length" and len(h.result().tokens) == 8 for h in handles)


def test_a_failing_request_fails_alone_and_the_engine_goes_on(model):
    """A prefill that raises (as jnp.int32(2**31) once did for ``top_k``), a step that raises, and a callback that
    raises each end their own requests with ``finish_reason="error"``; the others get the tokens they get alone."""
    requests = [EngineRequest(r.prompt_ids, r.videos, SamplingConfig(6), id=r.id) for r in _requests(model, 5, 4)]
    cfg = EngineConfig(num_slots=2, max_length=160, min_bucket=16)
    plain = _drive(Engine(model, None, cfg, eos_id=-1), requests, [0] * 5)
    engine = Engine(model, None, cfg, eos_id=-1)
    real_prefill = engine.programs.extend

    class Broken:  # the shared programs, but request 1's prefill raises (its prompt has a poison length)
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def extend(state, ds, ids, rows, flat, start, n, *rest):
            if int(start) + int(n) == len(requests[1].prompt_ids):
                raise OverflowError("Python int too large to convert to C int")
            return real_prefill(state, ds, ids, rows, flat, start, n, *rest)

    real, engine.programs = engine.programs, Broken()
    handles = [engine.submit(r, on_text=(lambda piece: 1 / 0) if i == 3 else None) for i, r in enumerate(requests)]
    engine.run()
    out = [h.result() for h in handles]
    assert out[1].finish_reason == "error" and out[1].error.startswith("OverflowError: ") and out[1].tokens == []
    for i in (0, 2, 3, 4):
        assert out[i].tokens == plain[i].tokens, i  # no tokenizer: request 3's on_text is never called
    # a decode step that raises fails the requests in the slots; the next ones run on a fresh decode state
    real_step = real.step
    calls = {"n": 0}

    def flaky_step(state, ds, active):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device lost")
        return real_step(state, ds, active)

    engine.programs = type("P", (), {"encode": staticmethod(real.encode), "step": staticmethod(flaky_step),
                                     "extend": staticmethod(real.extend), "traces": real.traces})()
    first = [engine.submit(r) for r in requests[:2]]
    engine.run()
    assert [h.result().finish_reason for h in first] == ["error", "error"]
    assert all("device lost" in h.result().error for h in first), [h.result().error for h in first]
    later = engine.submit(requests[2])
    engine.run()
    assert later.result().tokens == plain[2].tokens


def test_per_row_sampling_rules_match_generate_filters():
    """``sample_rows`` keeps exactly the tokens ``filter_logits`` keeps, per row, with per-row settings."""
    logits = jax.random.normal(jax.random.key(0), (3, 50))
    temps, ks, ps = np.array([0.0, 0.5, 2.0], np.float32), np.array([0, 5, 0], np.int32), np.array([1.0, 1.0, 0.9],
                                                                                                   np.float32)
    draw = jax.jit(jax.vmap(lambda c: sample_rows(logits, temps, ks, ps, np.uint32([1, 2, 3]),
                                                  jax.numpy.full((3,), c, jax.numpy.int32))[0]))
    draws = np.asarray(draw(np.arange(400)))
    assert (draws[:, 0] == np.argmax(logits[0])).all()
    for row, (t, k, p) in enumerate(zip(temps[1:], ks[1:], ps[1:]), start=1):
        allowed = np.flatnonzero(np.asarray(filter_logits(logits[row:row + 1] / t, int(k), float(p)))[0] > -1e29)
        assert len(allowed) > 1 and set(draws[:, row]) <= set(allowed.tolist())
        assert len(set(draws[:, row])) > 1


def test_streamed_text_and_stop_strings(model, tmp_path):
    from g4v_jax.data.tokenizer import build_bpe_tokenizer

    tok = build_bpe_tokenizer(["a red square moves ###Human: and then ###AI: it stops"] * 20, tmp_path,
                              vocab_size=300)
    engine = Engine(model, tok, EngineConfig(num_slots=2, max_length=160, min_bucket=16))
    rng = np.random.default_rng(4)
    pieces: dict[int, list[str]] = {0: [], 1: []}
    done = []
    reqs = [EngineRequest(_prompt(rng, 9, 0, 1) % 300, (), SamplingConfig(20), stop_strings=stops, id=i)
            for i, stops in enumerate([("###",), ("e",)])]
    handles = [engine.submit(r, on_text=pieces[r.id].append, on_done=done.append) for r in reqs]
    engine.run()
    for h in handles:
        res = h.result()
        assert "".join(pieces[res.id]) == res.text
        full = tok.decode(res.tokens, skip_special_tokens=True)
        if res.finish_reason == "stop":
            assert any(s in full for s in h.request.stop_strings)
        assert not any(s in res.text for s in h.request.stop_strings)
    assert sorted(r.id for r in done) == [0, 1]
