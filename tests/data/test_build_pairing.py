"""Related-caption pairing (paper §4.2): blocked JAX top-k, the bundled MiniLM, seeded grouping, the CLI."""

import csv
import json

import numpy as np
import pytest

from g4v_jax.data.build import pairing
from g4v_jax.data.build.pairing import (PairingError, build_caption_pool, build_groups, choose_partners,
                                        topk_neighbours)

TOPICS = {
    "cooking": ["A chef chops onions and garlic on a wooden cutting board",
                "Hands knead bread dough on a floured kitchen counter",
                "Vegetables sizzle in a frying pan on a gas stove",
                "A woman stirs tomato soup in a pot in her kitchen",
                "Close-up of a cook slicing fresh salmon for sushi"],
    "football": ["Soccer players run across the green field chasing the ball",
                 "A striker kicks the football into the goal net",
                 "The goalkeeper dives to save a penalty kick in a stadium",
                 "Football fans cheer in the stands during the match",
                 "Young boys practise dribbling a soccer ball on a pitch"],
    "ocean": ["Waves crash onto a sandy beach at sunset",
              "Aerial view of turquoise sea water along a rocky coastline",
              "A surfer rides a big wave in the ocean",
              "Seagulls fly over the sea near the shore",
              "Underwater shot of a coral reef with tropical fish"],
    "city night": ["Car headlights stream along a busy highway at night",
                   "Time lapse of city traffic and skyscrapers after dark",
                   "Neon signs glow on a crowded downtown street at night",
                   "Night aerial view of an illuminated city skyline",
                   "Taxis and buses drive through a rainy city street at night"],
}


@pytest.fixture(scope="module")
def minilm():
    """The real bundled all-MiniLM-L6-v2, loaded once (a few seconds)."""
    return pairing.load_sentence_model()


def brute_force_topk(queries, pool, k, self_ids=None):
    scores = queries.astype(np.float64) @ pool.astype(np.float64).T
    if self_ids is not None:
        scores[np.arange(len(queries)), self_ids] = -np.inf
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, idx, axis=1), idx


def unit_rows(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_topk_matches_brute_force_with_padded_blocks(rng):
    pool = unit_rows(rng, 203, 24)
    queries = unit_rows(rng, 37, 24)
    # 37 = 3*11 + 4 queries and 203 = 4*45 + 23 pool rows: both last blocks are padded
    pairing._merge_pool_block.clear_cache()
    scores, idx = topk_neighbours(queries, pool, 7, block_queries=11, block_pool=45)
    assert pairing._merge_pool_block._cache_size() == 1  # 5 pool blocks, the padded last one too: one program
    want_s, want_i = brute_force_topk(queries, pool, 7)
    np.testing.assert_array_equal(idx, want_i)  # random continuous vectors: no ties
    np.testing.assert_allclose(scores, want_s, rtol=0, atol=1e-5)
    assert scores.dtype == np.float32 and idx.shape == (37, 7)
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_topk_excludes_self_and_accepts_float16_pool(rng):
    pool = unit_rows(rng, 150, 16)
    query_ids = rng.choice(150, size=30, replace=False)
    queries = pool[query_ids]
    scores, idx = topk_neighbours(queries, pool.astype(np.float16), 5, exclude_self_ids=query_ids,
                                  block_queries=8, block_pool=64)
    assert not np.any(idx == query_ids[:, None])
    _, want_i = brute_force_topk(queries, pool, 5, query_ids)
    # float16 storage may swap near-equal neighbours; the sets must agree almost everywhere
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(idx, want_i)])
    assert overlap > 0.97
    # without exclusion each query's best match is itself, at cosine 1
    s_self, i_self = topk_neighbours(queries, pool, 1, block_queries=8, block_pool=64)
    np.testing.assert_array_equal(i_self[:, 0], query_ids)
    np.testing.assert_allclose(s_self[:, 0], 1.0, atol=1e-5)


def test_topk_full_ranking_never_returns_padding(rng):
    # k = N - 1: every real row, many with negative cosine, must outrank the zero-padded rows of the last block
    pool = unit_rows(rng, 23, 6)
    scores, idx = topk_neighbours(pool, pool, 22, exclude_self_ids=np.arange(23), block_queries=5, block_pool=10)
    want_s, want_i = brute_force_topk(pool, pool, 22, np.arange(23))
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_allclose(scores, want_s, atol=1e-5)


def test_topk_rejects_k_larger_than_the_pool(rng):
    pool = unit_rows(rng, 5, 4)
    with pytest.raises(PairingError, match="top-k 5"):
        topk_neighbours(pool, pool, 5, exclude_self_ids=np.arange(5))


def test_minilm_neighbours_share_the_topic(minilm):
    captions = [c for cs in TOPICS.values() for c in cs]
    topic = np.repeat(np.arange(len(TOPICS)), 5)
    emb = pairing.embed_captions(minilm, captions, batch_size=8, progress=False)
    assert emb.shape == (20, 384) and emb.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    _, idx = topk_neighbours(emb, emb, 3, exclude_self_ids=np.arange(20), block_queries=6, block_pool=7)
    same = topic[idx] == topic[:, None]
    assert same[:, 0].all(), [(captions[i], captions[j]) for i, j in enumerate(idx[:, 0]) if not same[i, 0]]
    assert same.mean() >= 0.9


def test_caption_pool_merges_duplicates_and_skips_empty_rows():
    rows = [(2, "1", "A dog  runs"), (3, "2", "  "), (4, "3", "a DOG runs\n"), (5, "4", "A cat sleeps"),
            (6, "", "A bird sings"), (7, "4", "A cow grazes")]
    pool = build_caption_pool(rows)
    assert pool.ids == ["1", "4"] and pool.captions == ["A dog runs", "A cat sleeps"]
    assert (pool.rows_read, pool.empty_skipped, pool.repeated_ids_dropped, pool.duplicates_merged) == (6, 2, 1, 1)


def test_jsonl_captions_and_reader_errors_naming_the_file_and_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"id": 7, "caption": " a dog\\n runs ", "url": "x"}\n\n{"id": "8", "caption": "a cat"}\n')
    pool = pairing.read_caption_pool(good)
    assert (pool.ids, pool.captions) == (["7", "8"], ["a dog runs", "a cat"])
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("videoid,caption\n1,a dog\n")
    with pytest.raises(PairingError, match=r"bad.csv:1: CSV header lacks column\(s\) \['name'\]"):
        pairing.read_caption_pool(bad_csv)
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"id": "1", "caption": "a dog"}\n{"id": "2", "text": "a cat"}\n')
    with pytest.raises(PairingError, match="bad.jsonl:2: 'caption' must be a string"):
        pairing.read_caption_pool(bad_jsonl)
    (tmp_path / "x.tsv").write_text("videoid\tname\n1\ta dog\n")
    with pytest.raises(PairingError, match="unknown captions format '.tsv'"):
        pairing.read_caption_pool(tmp_path / "x.tsv")


def test_grouping_is_seeded_and_draws_one_or_two_partners_from_the_top_k(rng):
    emb = unit_rows(rng, 400, 8)
    kwargs = dict(num_groups=300, top_k=10, block_queries=64, block_pool=128)
    a = build_groups(emb, seed=3, **kwargs)
    assert a == build_groups(emb, seed=3, **kwargs)
    assert a != build_groups(emb, seed=4, **kwargs)
    assert len({g.query for g in a}) == 300
    _, top = brute_force_topk(emb, emb, 10, np.arange(400))
    for g in a:
        assert 1 <= len(g.partners) <= 2 and len(set(g.partners)) == len(g.partners)
        assert set(g.partners) <= set(top[g.query]) and g.query not in g.partners
        assert list(g.scores) == sorted(g.scores, reverse=True)
    two = np.mean([len(g.partners) == 2 for g in a])
    assert 0.4 < two < 0.6
    assert all(len(g.partners) == 1 for g in build_groups(emb, seed=3, two_partner_prob=0.0, **kwargs))
    assert all(len(g.partners) == 2 for g in build_groups(emb, seed=3, two_partner_prob=1.0, **kwargs))


def test_choose_partners_is_uniform_over_the_top_k():
    k, n = 10, 20000
    scores = np.tile(np.linspace(0.9, 0.5, k, dtype=np.float32), (n, 1))
    neighbours = np.tile(np.arange(k), (n, 1))
    groups = choose_partners(np.arange(n), scores, neighbours, np.random.default_rng(0), two_partner_prob=0.5)
    counts = np.bincount([p for g in groups for p in g.partners], minlength=k)
    expected = n * 1.5 / k
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))


def write_webvid_csv(path, captions):
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        for i, c in enumerate(captions):
            w.writerow([1000 + i, f"https://example.invalid/{i}.mp4", "PT00H00M10S", "dir", c])


class CountingModel:
    """Wraps the real model and counts ``encode`` calls."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def encode(self, *args, **kwargs):
        self.calls += 1
        return self.model.encode(*args, **kwargs)


def test_cli_end_to_end_and_embedding_cache(tmp_path, monkeypatch, minilm, capsys):
    captions = [c for cs in TOPICS.values() for c in cs]
    captions += ["A STRIKER kicks the football into the goal   net", ""]  # a duplicate (case, spaces) and a blank
    src = tmp_path / "webvid.csv"
    write_webvid_csv(src, captions)
    counter = CountingModel(minilm)
    loads = []
    monkeypatch.setattr(pairing, "load_sentence_model", lambda path, device=None: loads.append(path) or counter)
    argv = ["--captions", str(src), "--num-groups", "8", "--top-k", "3", "--seed", "1", "--batch-size", "4",
            "--embeddings-cache", str(tmp_path / "cache"), "--no-progress"]

    pairing.main(argv + ["--out", str(tmp_path / "a.jsonl")])
    assert counter.calls > 0 and len(loads) == 1
    assert len(list((tmp_path / "cache").glob("embeddings-*.npy"))) == 1
    report = capsys.readouterr().out
    assert "| duplicate captions merged | 1 |" in report and "| rows skipped (empty id or caption) | 1 |" in report
    assert "| distinct captions (pool) | 20 |" in report and "| embedding cache | miss (written) |" in report

    lines = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [g["id"] for g in lines] == [f"g{i:05d}" for i in range(1, 9)]
    by_id = {str(1000 + i): c for i, c in enumerate(captions)}
    topic_of = {c: t for t, cs in TOPICS.items() for c in cs}
    for g in lines:
        assert set(g) == {"id", "captions", "scores"}
        assert 2 <= len(g["captions"]) <= 3 and len(g["scores"]) == len(g["captions"]) - 1
        texts = [c["caption"] for c in g["captions"]]
        assert all(set(c) == {"id", "caption"} and by_id[c["id"]] == c["caption"] for c in g["captions"])
        assert len({t.casefold() for t in texts}) == len(texts)  # never paired with itself or a duplicate
        assert all(-1 <= s <= 1 for s in g["scores"])
        assert topic_of[texts[0]] == topic_of[texts[1]]  # top-3 of 5 per topic: partners share the topic
    assert {g["captions"][0]["id"] for g in lines} <= set(by_id) - {"1020", "1021"}  # the first row of a duplicate

    calls = counter.calls
    pairing.main(argv + ["--out", str(tmp_path / "b.jsonl")])
    assert counter.calls == calls and len(loads) == 1  # cache hit: neither loaded nor encoded
    assert "| embedding cache | hit |" in capsys.readouterr().out
    assert (tmp_path / "b.jsonl").read_text() == (tmp_path / "a.jsonl").read_text()


def test_cli_reports_bad_input(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text('{"id": "1", "caption": "a dog"}\n{"id": "2", "caption": "a cat"}\n')
    with pytest.raises(SystemExit, match="--num-groups 5 must be between 1 and the number of distinct captions"):
        pairing.main(["--captions", str(src), "--out", str(tmp_path / "o.jsonl"), "--num-groups", "5",
                      "--model", str(tmp_path), "--no-progress"])
    with pytest.raises(SystemExit, match="not a local sentence-transformers directory"):
        pairing.main(["--captions", str(src), "--out", str(tmp_path / "o.jsonl"), "--num-groups", "1", "--top-k", "1",
                      "--model", str(tmp_path), "--no-progress"])
