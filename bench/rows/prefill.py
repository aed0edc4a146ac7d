"""Prefill: logits at the last position only on both sides (HF's ``logits_to_keep=1``, our ``logits_at``)."""

from __future__ import annotations

import numpy as np

from common import Context, Suite, attention_flops, llm_params, sync, token_ids, paired

ORDER = 10  # where the group's rows stand in the table


def rows(ctx: Context) -> list[dict]:
    hf, ours = ctx.models()
    return [prefill_row(ctx.suite, hf, ours, ctx.reps)]


def prefill_row(suite: Suite, hf, ours, reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx


    batch, length = suite.prefill
    ids = token_ids(suite, (batch, length), 0)
    graphdef, state = nnx.split(ours)

    @jax.jit
    def prefill(state, ids):
        model = nnx.merge(graphdef, state)
        cache = model.init_cache(batch, length, jnp.dtype(suite.dtype))
        return model(ids, cache=cache, logits_at=jnp.full((batch,), length - 1, jnp.int32))

    tids = torch.from_numpy(ids).long().to(suite.device)

    def peer():
        with torch.no_grad():
            out = hf(tids, use_cache=True, logits_to_keep=1).logits
        sync(suite)
        return out

    ours_logits = np.asarray(prefill(state, ids)[0], np.float32)[:, -1]
    peer_logits = peer()[:, -1].float().cpu().numpy()
    t_ours, t_peer = paired(lambda: jax.block_until_ready(prefill(state, ids)), peer, reps)
    layers, head = llm_params(suite.llm)
    flops = (2 * batch * length * layers + 2 * batch * head
             + attention_flops(batch, length, suite.llm["num_hidden_layers"], suite.llm["hidden_size"]))
    tokens = batch * length
    return {"work": f"prefill {batch}×{length}", "unit": "tok/s", "ours": tokens / t_ours, "peer": tokens / t_peer,
            "flops": flops / tokens, "max_abs_logit_diff": float(np.abs(ours_logits - peer_logits).max())}
