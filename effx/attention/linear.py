"""Linear attention: feature maps × decay/gating kinds × three agreeing forms, plus Based.

The recurrence (per head, state ``S: [d_k, d_v]``; ``d_k`` is the feature dim d_φ)::

    "none"   S_t = S_{t-1} + k_t v_tᵀ
    "retnet" S_t = γ_h S_{t-1} + k_t v_tᵀ                      (fixed per-head γ_h = 1 - 2^(-5-h))
    "gla"    S_t = diag(α_t) S_{t-1} + k_t v_tᵀ                (α_t ∈ (0,1)^{d_k} from x, low rank)
    "delta"  S_t = S_{t-1} + β_t k_t (v_t - S_{t-1}ᵀ k_t)ᵀ     (β_t = sigmoid(x W_β), |k_t| = 1)
    output   y_t = S_tᵀ q_t                                    (the current token included)

Decays are passed to the pure functions in log space: ``log_decay`` is ``None`` (no decay),
``[B, T, H]`` (one scalar per head and token: RetNet, or any data-dependent scalar gate) or
``[B, T, H, d_k]`` (diagonal gates: GLA); entries must be ≤ 0. The delta rule takes
``beta: [B, T, H]`` instead (the two cannot be combined).

Three forms compute the same function (values and gradients; the tests check it):

- ``linear_attention_parallel``: the masked quadratic reference, ``O(T²·d)`` (``O(T²·d_k)``
  memory for diagonal gates). It also accepts a general ancestor mask (draft-tree verification).
- ``linear_attention_chunked``: chunks of ``C`` tokens, the parallel form inside a chunk and the
  state across chunks, ``O(T·C·d + T·d²)``. Diagonal gates use a second level of sub-chunks
  (≤ 16 tokens) whose exponents are all ≤ 0, so any gate strength is stable. The delta rule uses
  the UT transform: ``U = (I + diag(β) L(KKᵀ))⁻¹ diag(β)(V - K S)`` by blocked forward substitution
  (``solve_unit_lower_blocked``).
  Lengths that are not a multiple of ``C`` are padded.
- ``linear_attention_recurrent``: a token-by-token ``lax.scan`` (what decode uses).

Packed documents (``segment_ids``): a document starts wherever the id changes; the state is
reset there (the parallel form masks cross-document pairs), so documents never interact.
The initial state (a cache) belongs to the document of the first token.

The normaliser ``z_t`` (denominator ``φ(q_t)ᵀ z_t``) obeys the same recurrence as ``S`` with
``v ≡ 1``, so modules append a column of ones to ``v`` and split it off afterwards.

Modules (one attention interface, see docs/contracts.md):
``LinearAttention`` (cache ``LinearAttentionCache``), ``SlidingWindowAttention`` (cache
``WindowKVCache``, a ring buffer) and ``BasedAttention`` (Taylor linear attention + sliding
window softmax attention summed in one layer, cache ``BasedCache``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from effx.attention.feature_maps import (FEATURE_MAP_KINDS, POSITIVE_FEATURE_MAPS, FeatureMap,
                                         orthogonal_random_matrix)

DECAY_KINDS: tuple[str, ...] = ("none", "retnet", "gla", "delta")
FORMS: tuple[str, ...] = ("parallel", "chunked", "recurrent")
IMPLS: tuple[str, ...] = ("xla", "pallas")
DELTA_FEATURE_MAPS: tuple[str, ...] = ("identity", "elu", "relu")

Array = jax.Array
Dtype = Any


# --------------------------------------------------------------------------------------------
# Pure functions: the three forms.
# --------------------------------------------------------------------------------------------


def _compute_dtype(*xs: Array | None) -> Dtype:
    dts = [x.dtype for x in xs if x is not None]
    return jnp.result_type(*dts, jnp.float32)


def _check_inputs(q: Array, k: Array, v: Array, log_decay: Array | None, beta: Array | None,
                  segment_ids: Array | None, initial_state: Array | None) -> None:
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"q/k shapes {q.shape}/{k.shape}: both must be [batch, T, heads, d_k]")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v shape {v.shape}: must be [batch, T, heads, d_v] with q {q.shape}")
    if log_decay is not None and beta is not None:
        raise ValueError("log_decay and beta: the delta rule (beta) takes no decay; pass one")
    if log_decay is not None and log_decay.shape not in (q.shape[:3], q.shape):
        raise ValueError(f"log_decay shape {log_decay.shape}: must be {q.shape[:3]} or {q.shape}")
    if beta is not None and beta.shape != q.shape[:3]:
        raise ValueError(f"beta shape {beta.shape}: must be {q.shape[:3]}")
    if segment_ids is not None and segment_ids.shape != q.shape[:2]:
        raise ValueError(f"segment_ids shape {segment_ids.shape}: must be {q.shape[:2]}")
    b, _, h, dk = q.shape
    if initial_state is not None and initial_state.shape != (b, h, dk, v.shape[-1]):
        raise ValueError(
            f"initial_state shape {initial_state.shape}: must be {(b, h, dk, v.shape[-1])}")


def _doc_ids(segment_ids: Array | None, batch: int, length: int) -> Array:
    """int32 [B, T] document index: 0 for the first document, +1 at every change of id."""
    if segment_ids is None:
        return jnp.zeros((batch, length), jnp.int32)
    change = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
    return jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), jnp.cumsum(change, axis=1)], 1)


def _exp_masked(x: Array, mask: Array) -> Array:
    """exp(x) where mask else 0, with no overflow or NaN gradient from the masked entries."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def _forward_substitution(a: Array, b: Array) -> Array:
    """X with (I + L) X = B, L the strictly lower part of ``a`` (diagonal and upper ignored)."""
    c = a.shape[-1]

    def body(i, x):  # rows ≥ i of x are still 0, so a[i] · x only sees j < i
        row = jax.lax.dynamic_index_in_dim(a, i, axis=-2, keepdims=False)
        xi = jax.lax.dynamic_index_in_dim(b, i, axis=-2, keepdims=False)
        xi = xi - jnp.einsum("...j,...je->...e", row, x)
        return jax.lax.dynamic_update_index_in_dim(x, xi, i, axis=-2)

    return jax.lax.fori_loop(0, c, body, jnp.zeros_like(b))


def _backward_substitution(a: Array, g: Array) -> Array:
    """Y with (I + L)ᵀ Y = G, L the strictly lower part of ``a``."""
    c = a.shape[-1]

    def body(n, y):  # i = c-1 .. 0; rows ≤ i of y are still 0, so a[:, i] · y sees j > i
        i = c - 1 - n
        col = jax.lax.dynamic_index_in_dim(a, i, axis=-1, keepdims=False)
        yi = jax.lax.dynamic_index_in_dim(g, i, axis=-2, keepdims=False)
        yi = yi - jnp.einsum("...j,...je->...e", col, y)
        return jax.lax.dynamic_update_index_in_dim(y, yi, i, axis=-2)

    return jax.lax.fori_loop(0, c, body, jnp.zeros_like(g))


@jax.custom_vjp
def solve_unit_lower(a: Array, b: Array) -> Array:
    """``(I + strict_lower(a))⁻¹ b`` for ``a: [..., C, C]``, ``b: [..., C, e]`` (same batch).

    Row-by-row forward substitution (``C`` vectorised steps; XLA's batched ``triangular_solve``
    is very slow on CPU) with a hand-written VJP that stores only ``a`` and the solution:
    ``db = (I + L)⁻ᵀ g``, ``da = -strict_lower(db xᵀ)``.
    """
    return _forward_substitution(a, b)


def _solve_fwd(a: Array, b: Array) -> tuple[Array, tuple[Array, Array]]:
    x = _forward_substitution(a, b)
    return x, (a, x)


def _solve_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    a, x = res
    db = _backward_substitution(a, g)
    c = a.shape[-1]
    strict = np.tril(np.ones((c, c), bool), -1)
    da = jnp.where(strict, -jnp.einsum("...ie,...je->...ij", db, x), 0.0).astype(a.dtype)
    return da, db


solve_unit_lower.defvjp(_solve_fwd, _solve_bwd)


def solve_unit_lower_blocked(a: Array, b: Array, block: int = 16) -> Array:
    """``solve_unit_lower`` by block rows of ≤ ``block``: small forward substitutions on the
    diagonal blocks and matmuls for the rest, so each substitution step touches a ``block``-row
    slice instead of the whole right-hand side (much less memory traffic for C = 64)."""
    c = a.shape[-1]
    s = _sub_chunk_size(c, block)
    if s == c or s < min(8, block):  # no useful block size divides c
        return solve_unit_lower(a, b)
    xs: list[Array] = []
    for i in range(0, c, s):
        rhs = b[..., i:i + s, :]
        if xs:
            rhs = rhs - jnp.einsum("...ij,...je->...ie", a[..., i:i + s, :i],
                                   jnp.concatenate(xs, axis=-2))
        xs.append(solve_unit_lower(a[..., i:i + s, i:i + s], rhs))
    return jnp.concatenate(xs, axis=-2)


def linear_attention_parallel(
    q: Array, k: Array, v: Array, *, log_decay: Array | None = None,
    beta: Array | None = None, segment_ids: Array | None = None,
    initial_state: Array | None = None, mask: Array | None = None,
) -> tuple[Array, Array]:
    """Masked quadratic form (the reference), ``O(T²)``.

    Args:
      q, k: features ``[B, T, H, d_k]`` (already through φ; L2-normalised for the delta rule).
      v: values ``[B, T, H, d_v]``.
      log_decay: ``None``, ``[B, T, H]`` (scalar per head) or ``[B, T, H, d_k]`` (diagonal),
        entries ≤ 0: ``S_t = exp(log_decay_t) ⊙ S_{t-1} + k_t v_tᵀ``.
      beta: ``[B, T, H]`` in (0, 1): use the delta rule (exclusive with ``log_decay``).
      segment_ids: int ``[B, T]``; a new document starts where the id changes.
      initial_state: ``[B, H, d_k, d_v]`` state before token 0 (default zeros).
      mask: bool ``[B, T, T]`` ancestor-or-self mask (default causal). For a draft tree,
        ``mask[i, j]`` says j is on i's root path; ancestors must come first (lower-triangular)
        and decay accumulates along the path only (``G_i = Σ_j mask[i, j] log_decay_j``).

    Returns:
      ``y: [B, T, H, d_v]`` (dtype of ``v``) and the state after the last token (along its
      path) ``[B, H, d_k, d_v]`` (float32 or wider).
    """
    _check_inputs(q, k, v, log_decay, beta, segment_ids, initial_state)
    out_dtype = v.dtype
    cdt = _compute_dtype(q, k, v, log_decay, beta, initial_state)
    q, k, v = q.astype(cdt), k.astype(cdt), v.astype(cdt)
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    doc = _doc_ids(segment_ids, b, t)
    if mask is None:
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    elif mask.shape != (b, t, t):
        raise ValueError(f"mask shape {mask.shape}: must be {(b, t, t)}")
    allowed = mask.astype(bool) & (doc[:, :, None] == doc[:, None, :])  # [B, T, T]
    first = doc == 0  # sees the initial state, [B, T]
    last = allowed[:, t - 1, :]  # contributes to the final state, [B, T]
    keep = first[:, t - 1]  # the initial state survives to the end, [B]
    s0 = (jnp.zeros((b, h, dk, dv), cdt) if initial_state is None
          else initial_state.astype(cdt))
    allowed_h = allowed[:, None]  # [B, 1, T, T]

    if beta is not None:  # delta rule: U = A⁻¹ diag(β)(V - m K S0), A = I + diag(β) L(KKᵀ)
        beta = beta.astype(cdt)
        bt = jnp.moveaxis(beta, 1, 2)  # [B, H, T]
        kk = jnp.einsum("bihd,bjhd->bhij", k, k)
        strict = allowed_h & ~jnp.eye(t, dtype=bool)
        a = bt[..., :, None] * jnp.where(strict, kk, 0.0)  # strictly lower part of A
        ks0 = jnp.einsum("bihd,bhde->bhie", k, s0)
        rhs = bt[..., None] * (jnp.moveaxis(v, 1, 2) - first[:, None, :, None] * ks0)
        u = solve_unit_lower_blocked(a, rhs)  # [B, H, T, dv]
        qk = jnp.where(allowed_h, jnp.einsum("bihd,bjhd->bhij", q, k), 0.0)
        y = jnp.einsum("bhij,bhje->bihe", qk, u)
        y = y + first[:, :, None, None] * jnp.einsum("bihd,bhde->bihe", q, s0)
        kl = k * last[:, :, None, None]
        state = keep[:, None, None, None] * s0 + jnp.einsum("bjhd,bhje->bhde", kl, u)
        return y.astype(out_dtype), state

    if log_decay is None:
        scores = jnp.einsum("bihd,bjhd->bhij", q, k)
        qs, kl = q, k
        total = jnp.ones((b, h, 1, 1), cdt)
    else:
        g = log_decay.astype(cdt)
        gpath = jnp.einsum("bij,bjh...->bih...", mask.astype(cdt), g)  # path cumsum G
        if g.ndim == 3:  # scalar per head
            diff = jnp.moveaxis(gpath[:, :, None, :] - gpath[:, None, :, :], 3, 1)  # [B,H,T,T]
            scores = jnp.einsum("bihd,bjhd->bhij", q, k) * _exp_masked(diff, allowed_h)
            qs = q * jnp.exp(gpath)[..., None]
            last_g = gpath[:, t - 1]  # [B, H]
            kl = k * _exp_masked(last_g[:, None] - gpath, last[:, :, None])[..., None]
            total = jnp.exp(last_g)[..., None, None]
        else:  # diagonal gates
            diff = gpath[:, :, None] - gpath[:, None, :]  # [B, T, T, H, dk]
            dec = _exp_masked(diff, allowed[..., None, None])
            scores = jnp.einsum("bihd,bjhd,bijhd->bhij", q, k, dec)
            qs = q * jnp.exp(gpath)
            last_g = gpath[:, t - 1]  # [B, H, dk]
            kl = k * _exp_masked(last_g[:, None] - gpath, last[:, :, None, None])
            total = jnp.exp(last_g)[..., None]
    scores = jnp.where(allowed_h, scores, 0.0)
    y = jnp.einsum("bhij,bjhe->bihe", scores, v)
    y = y + first[:, :, None, None] * jnp.einsum("bihd,bhde->bihe", qs, s0)
    kl = kl * last[:, :, None, None]
    state = keep[:, None, None, None] * total * s0 + jnp.einsum("bjhd,bjhe->bhde", kl, v)
    return y.astype(out_dtype), state


def _to_chunks(x: Array, c: int) -> Array:
    """[B, N*C, H, ...] -> [B, H, N, C, ...]."""
    b, tp, h = x.shape[:3]
    x = x.reshape((b, tp // c, c, h) + x.shape[3:])
    return jnp.moveaxis(x, 3, 1)


def _from_chunks(x: Array) -> Array:
    """[B, H, N, C, ...] -> [B, N*C, H, ...]."""
    x = jnp.moveaxis(x, 1, 3)
    b, n, c, h = x.shape[:4]
    return x.reshape((b, n * c, h) + x.shape[4:])


def _sub_chunk_size(c: int, limit: int = 16) -> int:
    return max(s for s in range(1, min(c, limit) + 1) if c % s == 0)


def _gla_intra_chunk(q: Array, k: Array, gcum: Array) -> Array:
    """Intra-chunk scores ``A[i, j] = Σ_d q_id k_jd exp(G_id - G_jd)`` for ``j ≤ i`` (else junk
    masked later), stable for any gate strength.

    ``q, k, gcum: [..., C, d_k]`` with ``gcum`` the in-chunk cumulative log gates. Sub-chunks of
    ``c ≤ 16``: pairs in earlier sub-chunks factor through the end of the previous sub-chunk
    (both factors ``≤ 1``); pairs in the same sub-chunk use the ``[c, c, d_k]`` tensor.
    Returns ``[..., C, C]``.
    """
    *lead, big_c, dk = q.shape
    c = _sub_chunk_size(big_c)
    ns = big_c // c
    qs = q.reshape(*lead, ns, c, dk)
    ks = k.reshape(*lead, ns, c, dk)
    gs = gcum.reshape(*lead, ns, c, dk)
    gref = jnp.concatenate([jnp.zeros_like(gs[..., :1, -1, :]), gs[..., :-1, -1, :]], axis=-2)
    q_scaled = qs * jnp.exp(gs - gref[..., None, :])  # [..., ns, c, dk], factors ≤ 1
    valid = (np.arange(big_c)[None, :] < (np.arange(ns) * c)[:, None])[..., None]  # [ns, C, 1]
    k_scaled = k[..., None, :, :] * _exp_masked(gref[..., :, None, :] - gcum[..., None, :, :],
                                                valid)  # [..., ns, C, dk]
    inter = jnp.einsum("...pid,...pjd->...pij", q_scaled, k_scaled).reshape(*lead, big_c, big_c)
    tri = np.tril(np.ones((c, c), bool))[..., None]
    dec = _exp_masked(gs[..., :, None, :] - gs[..., None, :, :], tri)  # [..., ns, c, c, dk]
    intra = jnp.einsum("...pid,...pjd,...pijd->...pij", qs, ks, dec)
    block_diag = jnp.einsum("...pij,pr->...pirj", intra, jnp.eye(ns, dtype=intra.dtype))
    return inter + block_diag.reshape(*lead, big_c, big_c)


def linear_attention_chunked(
    q: Array, k: Array, v: Array, *, log_decay: Array | None = None,
    beta: Array | None = None, segment_ids: Array | None = None,
    initial_state: Array | None = None, chunk_size: int = 64,
) -> tuple[Array, Array]:
    """Chunked form, ``O(T·C·d + T·d²)`` time and ``O(T·C + T/C·d²)`` memory.

    Same arguments and results as ``linear_attention_parallel`` (without ``mask``: causal)
    plus ``chunk_size`` (C > 0; T need not be a multiple, the tail is zero-padded).
    """
    _check_inputs(q, k, v, log_decay, beta, segment_ids, initial_state)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size}: must be > 0")
    out_dtype = v.dtype
    cdt = _compute_dtype(q, k, v, log_decay, beta, initial_state)
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    c = chunk_size
    n = -(-t // c)
    pad = n * c - t
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
    if pad:
        zpad = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        q, k, v = zpad(q), zpad(k), zpad(v)
        log_decay = None if log_decay is None else zpad(log_decay)
        beta = None if beta is None else zpad(beta)
        seg = jnp.pad(seg, [(0, 0), (0, pad)], mode="edge")  # padding continues the last doc
    doc = _doc_ids(seg, b, n * c).reshape(b, n, c)
    qc, kc, vc = (_to_chunks(x.astype(cdt), c) for x in (q, k, v))  # [B, H, N, C, ·]
    causal = np.tril(np.ones((c, c), bool))
    allowed = (causal & (doc[..., :, None] == doc[..., None, :]))[:, None]  # [B, 1, N, C, C]
    doc_prev = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), doc[:, :-1, -1]], axis=1)
    m = (doc == doc_prev[..., None])[:, None].astype(cdt)  # sees the carried state [B,1,N,C]
    l = (doc == doc[..., -1:])[:, None].astype(cdt)  # reaches the chunk's end state [B,1,N,C]
    keep = m[..., -1]  # carried state survives the chunk [B, 1, N]
    s0 = (jnp.zeros((b, h, dk, dv), cdt) if initial_state is None
          else initial_state.astype(cdt))

    if beta is not None:  # delta rule via the UT transform
        bc = _to_chunks(beta.astype(cdt), c)  # [B, H, N, C]
        strict = allowed & ~np.eye(c, dtype=bool)
        kk = jnp.einsum("bhncd,bhnsd->bhncs", kc, kc)
        a = bc[..., :, None] * jnp.where(strict, kk, 0.0)  # strictly lower part of A
        rhs = jnp.concatenate([bc[..., None] * vc, (bc * m)[..., None] * kc], axis=-1)
        sol = solve_unit_lower_blocked(a, rhs)
        u_tilde, w = sol[..., :dv], sol[..., dv:]  # [B, H, N, C, dv], [B, H, N, C, dk]
        kl = kc * l[..., None]

        def body(s, xs):
            ut_n, w_n, kl_n, keep_n = xs
            u_n = ut_n - jnp.einsum("bhcd,bhde->bhce", w_n, s)
            s_new = keep_n[..., None, None] * s + jnp.einsum("bhcd,bhce->bhde", kl_n, u_n)
            return s_new, (s, u_n)

        xs = tuple(jnp.moveaxis(x, 2, 0) for x in (u_tilde, w, kl, jnp.broadcast_to(
            keep, (b, h, n))))
        state, (s_prev, u) = jax.lax.scan(body, s0, xs)
        s_prev, u = jnp.moveaxis(s_prev, 0, 2), jnp.moveaxis(u, 0, 2)
        qk = jnp.where(allowed, jnp.einsum("bhncd,bhnsd->bhncs", qc, kc), 0.0)
        y = jnp.einsum("bhncs,bhnse->bhnce", qk, u)
        y = y + jnp.einsum("bhncd,bhnde->bhnce", qc * m[..., None], s_prev)
        return _from_chunks(y)[:, :t].astype(out_dtype), state

    if log_decay is None:
        scores = jnp.einsum("bhncd,bhnsd->bhncs", qc, kc)
        q_in, k_out = qc, kc
        chunk_decay = jnp.ones((1, 1, n, 1, 1), cdt)
    elif log_decay.ndim == 3:  # scalar per head
        gc = jnp.cumsum(_to_chunks(log_decay.astype(cdt), c), axis=-1)  # [B, H, N, C]
        diff = gc[..., :, None] - gc[..., None, :]
        scores = jnp.einsum("bhncd,bhnsd->bhncs", qc, kc) * _exp_masked(diff, allowed)
        q_in = qc * jnp.exp(gc)[..., None]
        k_out = kc * jnp.exp(gc[..., -1:] - gc)[..., None]
        chunk_decay = jnp.exp(gc[..., -1])[..., None, None]
    else:  # diagonal gates
        gc = jnp.cumsum(_to_chunks(log_decay.astype(cdt), c), axis=-2)  # [B, H, N, C, dk]
        scores = _gla_intra_chunk(qc, kc, gc)
        q_in = qc * jnp.exp(gc)
        k_out = kc * jnp.exp(gc[..., -1:, :] - gc)
        chunk_decay = jnp.exp(gc[..., -1, :])[..., None]  # [B, H, N, dk, 1]
    scores = jnp.where(allowed, scores, 0.0)
    y = jnp.einsum("bhncs,bhnse->bhnce", scores, vc)
    ds = jnp.einsum("bhncd,bhnce->bhnde", k_out * l[..., None], vc)  # [B, H, N, dk, dv]
    chunk_decay = jnp.broadcast_to(chunk_decay * keep[..., None, None], (b, h, n) +
                                   chunk_decay.shape[3:])

    def body(s, xs):
        a_n, ds_n = xs
        return a_n * s + ds_n, s

    state, s_prev = jax.lax.scan(
        body, s0, (jnp.moveaxis(chunk_decay, 2, 0), jnp.moveaxis(ds, 2, 0)))
    s_prev = jnp.moveaxis(s_prev, 0, 2)  # [B, H, N, dk, dv]
    y = y + jnp.einsum("bhncd,bhnde->bhnce", q_in * m[..., None], s_prev)
    return _from_chunks(y)[:, :t].astype(out_dtype), state


def linear_attention_step(
    state: Array, q: Array, k: Array, v: Array, *, log_decay: Array | None = None,
    beta: Array | None = None, reset: Array | None = None,
) -> tuple[Array, Array]:
    """One recurrent step for one token per row.

    Args:
      state: ``[B, H, d_k, d_v]``; q, k: ``[B, H, d_k]``; v: ``[B, H, d_v]``;
      log_decay: ``None``, ``[B, H]`` or ``[B, H, d_k]``; beta: ``None`` or ``[B, H]``;
      reset: bool ``[B]``, zero the state first (the token starts a document).

    Returns:
      ``y: [B, H, d_v]`` (= ``new_stateᵀ q``) and the new state (dtype of ``state``).
    """
    if reset is not None:
        state = jnp.where(reset[:, None, None, None], 0.0, state)
    if log_decay is not None:
        a = jnp.exp(log_decay)
        state = state * (a[..., None, None] if log_decay.ndim == 2 else a[..., None])
    if beta is not None:
        v = beta[..., None] * (v - jnp.einsum("bhd,bhde->bhe", k, state))
    state = state + k[..., :, None] * v[..., None, :]
    return jnp.einsum("bhd,bhde->bhe", q, state), state


def linear_attention_recurrent(
    q: Array, k: Array, v: Array, *, log_decay: Array | None = None,
    beta: Array | None = None, segment_ids: Array | None = None,
    initial_state: Array | None = None,
) -> tuple[Array, Array]:
    """Token-by-token ``lax.scan`` form, ``O(T·d²)``; same arguments/results as
    ``linear_attention_parallel`` (without ``mask``: causal)."""
    _check_inputs(q, k, v, log_decay, beta, segment_ids, initial_state)
    out_dtype = v.dtype
    cdt = _compute_dtype(q, k, v, log_decay, beta, initial_state)
    b, t, h, dk = q.shape
    doc = _doc_ids(segment_ids, b, t)
    reset = jnp.concatenate([jnp.zeros((b, 1), bool), doc[:, 1:] != doc[:, :-1]], axis=1)
    s0 = (jnp.zeros((b, h, dk, v.shape[-1]), cdt) if initial_state is None
          else initial_state.astype(cdt))
    tfirst = lambda x: None if x is None else jnp.moveaxis(x.astype(cdt), 1, 0)

    def body(s, xs):
        q_t, k_t, v_t, g_t, b_t, r_t = xs
        y_t, s = linear_attention_step(s, q_t, k_t, v_t, log_decay=g_t, beta=b_t, reset=r_t)
        return s, y_t

    xs = (tfirst(q), tfirst(k), tfirst(v), tfirst(log_decay), tfirst(beta),
          jnp.moveaxis(reset, 1, 0))
    state, y = jax.lax.scan(body, s0, xs)
    return jnp.moveaxis(y, 0, 1).astype(out_dtype), state


def linear_attention(q: Array, k: Array, v: Array, *, form: str = "chunked",
                     chunk_size: int = 64, **kwargs: Any) -> tuple[Array, Array]:
    """Dispatch to one of the three forms by name (``form`` in ``FORMS``)."""
    if form == "parallel":
        return linear_attention_parallel(q, k, v, **kwargs)
    if form == "chunked":
        return linear_attention_chunked(q, k, v, chunk_size=chunk_size, **kwargs)
    if form == "recurrent":
        return linear_attention_recurrent(q, k, v, **kwargs)
    raise ValueError(f"form={form!r}: must be one of {FORMS}")


# --------------------------------------------------------------------------------------------
# Small helpers shared by the modules (self-contained: no effx.layers import).
# --------------------------------------------------------------------------------------------


class _Projection(nn.Module):
    """``nn.DenseGeneral`` without bias whose kernel keeps its logical axis names.

    (DenseGeneral initialises a flattened 2-D kernel, which breaks a multi-axis logical
    constraint under a mesh; here the init runs on the flat shape and is reshaped before
    the names are attached, with the same fan-in.)
    """

    features: tuple[int, ...]
    axis: tuple[int, ...]
    names: tuple[str | None, ...]
    kernel_init: Any
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: Array) -> Array:
        axes = tuple(a % x.ndim for a in self.axis)
        in_shape = tuple(x.shape[a] for a in axes)

        def init(key, shape, dtype):
            flat = (int(np.prod(in_shape)), int(np.prod(self.features)))
            return self.kernel_init(key, flat, dtype).reshape(shape)

        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.names),
                            in_shape + tuple(self.features), self.param_dtype)
        return jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype),
                             axes=(axes, tuple(range(len(axes)))))


def _dense(features: tuple[int, ...], axis: int | tuple[int, ...], names: tuple[str | None, ...],
           dtype: Dtype, param_dtype: Dtype, name: str, init: Any = None) -> _Projection:
    axis = (axis,) if isinstance(axis, int) else tuple(axis)
    return _Projection(tuple(features), axis, tuple(names),
                       init or nn.initializers.lecun_normal(), dtype, param_dtype, name=name)


def _rms_norm(x: Array, scale: Array, eps: float) -> Array:
    """RMSNorm over the last axis in float32; ``x: [..., d]``, ``scale: [d]``."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * scale.astype(jnp.float32)).astype(x.dtype)


def _l2_normalize(x: Array, eps: float = 1e-6) -> Array:
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def _pad_to(x: Array, size: int, axis: int = 1) -> Array:
    """Zero-pad (or, if longer, zero out) ``x`` along ``axis`` to ``size`` entries."""
    if x.shape[axis] > size:
        return jnp.zeros(x.shape[:axis] + (size,) + x.shape[axis + 1:], x.dtype)
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _gather_tokens(x: Array, idx: Array) -> Array:
    """``x: [B, M, ...]``, ``idx: int [B, A]`` -> ``[B, A, ...]``."""
    idx = jnp.clip(idx, 0, x.shape[1] - 1)
    return jax.vmap(lambda xb, ib: xb[ib])(x, idx)


def _retnet_log_decay(num_heads: int) -> np.ndarray:
    """RetNet's fixed per-head decay, ``log γ_h = log(1 - 2^(-5-h))``, float32 ``[H]``."""
    return np.log1p(-np.exp2(-5.0 - np.arange(num_heads, dtype=np.float64))).astype(np.float32)


# --------------------------------------------------------------------------------------------
# LinearAttention.
# --------------------------------------------------------------------------------------------


def _check_layer_inputs(owner: str, x: Array, positions: Array) -> None:
    """One-line errors for the wrong ranks or dtypes of a layer's inputs, before any compute."""
    if x.ndim != 3:
        raise ValueError(f"{owner}: x must be [batch, seq, embed], got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{owner}: x must be a floating array, got dtype {x.dtype}")
    if positions.shape != x.shape[:2] or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"{owner}: positions must be int [batch, seq]={x.shape[:2]}, got "
                         f"{positions.dtype} {positions.shape}")


@flax.struct.dataclass
class LinearAttentionCache:
    """Recurrent state of ``LinearAttention`` (O(1) in the sequence length).

    Attributes:
      state: ``[B, H, d_φ, d_v]`` S after the last written token (float, ``init_cache`` dtype).
      z: ``[B, H, d_φ]`` normaliser (``use_denominator``) or ``None``.
      length: int32 ``[B]`` tokens consumed so far.
      prev_state, prev_z: ``state``/``z`` before the last call (what ``commit`` advances).
      new_k: ``[B, M, H, d_φ]`` key features of the last call's new tokens (M =
        ``max_new_tokens``; all zeros when the last call had T > M: commit is then invalid).
      new_v: ``[B, M, H, d_v]`` their values.
      new_log_decay: ``[B, M, H]`` (retnet) / ``[B, M, H, d_φ]`` (gla) log decays, or ``None``.
      new_beta: ``[B, M, H]`` delta-rule β, or ``None``.
      max_new_tokens: static M.
    """

    state: Array
    z: Array | None
    length: Array
    prev_state: Array
    prev_z: Array | None
    new_k: Array
    new_v: Array
    new_log_decay: Array | None
    new_beta: Array | None
    max_new_tokens: int = flax.struct.field(pytree_node=False, default=64)

    def commit(self, start: Array, accepted: Array, num_accepted: Array) -> "LinearAttentionCache":
        """Advance the pre-call state along the accepted tokens only.

        Args:
          start: int32 ``[B]`` cache length before the verification call.
          accepted: int32 ``[B, A]`` indices into the last call's T ≤ M new tokens, root to leaf.
          num_accepted: int32 ``[B]`` how many leading entries of ``accepted`` count.

        Returns:
          The cache sequential decoding of those tokens would have produced
          (``length = start + num_accepted``; ``prev_*`` set to that state too).
        """
        aug = self.prev_state if self.prev_z is None else jnp.concatenate(
            [self.prev_state, self.prev_z[..., None]], axis=-1)
        dv = self.prev_state.shape[-1]
        k = _gather_tokens(self.new_k, accepted).astype(aug.dtype)
        v = _gather_tokens(self.new_v, accepted).astype(aug.dtype)
        if self.prev_z is not None:
            v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
        g = None if self.new_log_decay is None else _gather_tokens(
            self.new_log_decay, accepted).astype(aug.dtype)
        beta = None if self.new_beta is None else _gather_tokens(
            self.new_beta, accepted).astype(aug.dtype)
        valid = jnp.arange(accepted.shape[1])[None, :] < num_accepted[:, None]  # [B, A]
        tfirst = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)

        def body(s, xs):
            k_t, v_t, g_t, b_t, ok = xs
            _, s_new = linear_attention_step(s, k_t, k_t, v_t, log_decay=g_t, beta=b_t)
            return jnp.where(ok[:, None, None, None], s_new, s), None

        aug, _ = jax.lax.scan(body, aug, (tfirst(k), tfirst(v), tfirst(g), tfirst(beta),
                                          tfirst(valid)))
        state = aug[..., :dv]
        z = None if self.prev_z is None else aug[..., dv]
        return self.replace(state=state, z=z, prev_state=state, prev_z=z,
                            length=(start + num_accepted).astype(jnp.int32))


class LinearAttention(nn.Module):
    """Linear attention with feature maps, decay/gating kinds and three agreeing forms.

    Called as ``y, cache = attn(x, positions, *, segment_ids=None, cache=None,
    new_token_mask=None)`` with ``x: [B, T, embed]`` (``dtype``), ``positions`` int32
    ``[B, T]`` (unused: linear attention has no positional term; tree depths come from
    ``new_token_mask``), ``segment_ids`` int32 ``[B, T]``; returns ``y: [B, T, embed]``.

    - ``cache=None``: causal over the sequence in form ``form``; returns ``(y, None)``.
    - ``cache`` and no ``new_token_mask``: the T tokens extend the state in order (T = 1:
      one recurrent step; T > 1: the chunked form from the cached state); returns the cache
      with ``length + T``. With a cache, ``segment_ids`` only marks padding: tokens with id 0
      leave the state untouched (prefill right-padded prompts this way, then set ``length``
      to the prompt lengths; a recurrent state cannot forget tokens it has consumed).
    - ``cache`` and ``new_token_mask`` (bool ``[B, T, T]``, ancestor-or-self, ancestors first):
      draft-tree verification, ``y_i = φ(q_i)ᵀ(D_i S + Σ_{j anc-or-self of i} D_ij φ(k_j) v_jᵀ)``
      with decays taken along i's path (RetNet: γ^(depth difference); depth = number of
      ancestors). The returned cache's state is that of node T-1's path; call
      ``cache.commit(start, accepted, num_accepted)`` to advance the pre-call state along the
      accepted path (needs T ≤ ``max_new_tokens``).

    Supported combinations:
      - ``decay`` "none" / "retnet" / "gla": every feature map.
      - ``decay`` "delta": ``feature_map`` in ("identity", "elu", "relu"); q and k features are
        L2-normalised after φ; no denominator.
      - ``use_denominator`` (``y = φ(q)ᵀS / (φ(q)ᵀz + eps)``, z decayed like S): positive
        feature maps ("elu", "relu", "taylor", "performer") with decay "none"/"retnet"/"gla".
      - ``impl="pallas"``: the chunked computations (``form="chunked"`` without a cache, and
        the chunked prefill into a cache) run the Pallas kernel
        (``effx.pallas_kernels.linear_attention``: the TPU kernel on TPU and, interpreted, on
        CPU; on GPU the Mosaic GPU kernel for decay "none"/"retnet" with a 16-bit ``dtype`` and
        ``chunk_size=64``, XLA otherwise) for decay "none" / "retnet" / "gla"; with a 16-bit
        ``dtype`` the kernel's q/k/v inputs are cast to it (state and accumulation stay
        float32). The other forms and the decode / tree paths stay XLA. Not with
        ``decay="delta"``.
      - ``output_norm`` (per-head RMSNorm with a learned ``[d_v]`` scale before the output
        projection): any combination, alone or with the denominator.
      - ``stream_block`` (a multiple of ``chunk_size``, or None): without a cache and with
        ``form="chunked"``, sequences longer than this run block by block (``nn.scan`` carrying
        the state; projections, features, core and output per block), so time stays linear in
        T on a CPU once whole-sequence tensors outgrow the caches, and activation memory is per
        block. None: one pass over the whole sequence. Same parameters and results either way.

    Parameters (logical axes): ``q, k: [embed, heads, qk_dim]`` ("embed", "heads", "head_dim"),
    ``v: [embed, heads, head_dim]``, ``o: [heads, head_dim, embed]``; gla: ``gate_down:
    [embed, gate_rank]`` ("embed", None), ``gate_up: [gate_rank, heads, d_φ]`` and bias
    ``[heads, d_φ]``; delta: ``beta: [embed, heads]``; norm scale ``[head_dim]``.
    Performer's ``[m, qk_dim]`` orthogonal projection is drawn at init from ``performer_seed``
    and stored in the non-trainable collection "constants" (never redrawn on a schedule). Where
    that collection is not passed or not carried (``apply({"params": ...})``, a ``nn.scan`` over
    layers without it) the identical matrix is recomputed from the seed, so results agree.
    """

    num_heads: int
    head_dim: int
    qk_dim: int | None = None  # dim of q/k before φ (default head_dim; Based uses 16)
    feature_map: str = "elu"
    num_random_features: int | None = None  # Performer's m (default qk_dim)
    performer_seed: int = 0  # seed of Performer's fixed random projection
    decay: str = "none"
    use_denominator: bool = False
    output_norm: bool = True
    form: str = "chunked"
    chunk_size: int = 64
    stream_block: int | None = 1024
    impl: str = "xla"  # "pallas": the chunked form through the Pallas kernel
    gate_rank: int = 16
    gate_logit_normalizer: float = 16.0
    max_new_tokens: int = 64
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        for name in ("num_heads", "head_dim", "chunk_size", "gate_rank", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name}={value!r}: must be a positive int")
        if self.stream_block is not None and (
                not isinstance(self.stream_block, (int, np.integer)) or self.stream_block <= 0
                or self.stream_block % self.chunk_size):
            raise ValueError(f"stream_block={self.stream_block!r}: must be None or a positive "
                             f"multiple of chunk_size={self.chunk_size}")
        if self.qk_dim is not None and self.qk_dim <= 0:
            raise ValueError(f"qk_dim={self.qk_dim!r}: must be a positive int or None")
        if self.feature_map not in FEATURE_MAP_KINDS:
            raise ValueError(f"feature_map={self.feature_map!r}: must be one of "
                             f"{FEATURE_MAP_KINDS}")
        FeatureMap(self.feature_map, self.num_random_features)  # validates m
        if self.decay not in DECAY_KINDS:
            raise ValueError(f"decay={self.decay!r}: must be one of {DECAY_KINDS}")
        if self.form not in FORMS:
            raise ValueError(f"form={self.form!r}: must be one of {FORMS}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl={self.impl!r}: must be one of {IMPLS}")
        if self.impl == "pallas" and self.decay == "delta":
            raise ValueError("impl='pallas' with decay='delta': the kernel supports decay "
                             "'none', 'retnet', 'gla'")
        if self.decay == "delta" and self.feature_map not in DELTA_FEATURE_MAPS:
            raise ValueError(f"feature_map={self.feature_map!r} with decay='delta': must be one "
                             f"of {DELTA_FEATURE_MAPS}")
        if self.use_denominator and self.decay == "delta":
            raise ValueError("use_denominator=True with decay='delta': not supported (use "
                             "output_norm)")
        if self.use_denominator and not FeatureMap(self.feature_map).is_positive:
            raise ValueError(f"use_denominator=True with feature_map={self.feature_map!r}: "
                             f"needs a positive map in {POSITIVE_FEATURE_MAPS}")
        if not self.gate_logit_normalizer > 0:
            raise ValueError(f"gate_logit_normalizer={self.gate_logit_normalizer!r}: must be > 0")
        if not self.eps > 0:
            raise ValueError(f"eps={self.eps!r}: must be > 0")
        super().__post_init__()

    # ---- static sizes ----
    @property
    def key_dim(self) -> int:
        """Dim of q/k before the feature map."""
        return self.qk_dim or self.head_dim

    @property
    def feature_dim(self) -> int:
        """d_φ, the state's row count."""
        return FeatureMap(self.feature_map, self.num_random_features).output_dim(self.key_dim)

    def init_cache(self, batch: int, max_len: int, dtype: Dtype = jnp.float32, *,
                   embed_dim: int | None = None
                   ) -> LinearAttentionCache:
        """Empty cache (zero state, length 0). ``max_len`` and ``embed_dim`` are unused (the
        state is O(1)); ``dtype`` is the state's dtype (float32 recommended)."""
        del max_len, embed_dim
        h, dk, dv, m = self.num_heads, self.feature_dim, self.head_dim, self.max_new_tokens
        state = jnp.zeros((batch, h, dk, dv), dtype)
        z = jnp.zeros((batch, h, dk), dtype) if self.use_denominator else None
        log_decay = {"retnet": jnp.zeros((batch, m, h), dtype),
                     "gla": jnp.zeros((batch, m, h, dk), dtype)}.get(self.decay)
        beta = jnp.zeros((batch, m, h), dtype) if self.decay == "delta" else None
        return LinearAttentionCache(
            state=state, z=z, length=jnp.zeros((batch,), jnp.int32), prev_state=state,
            prev_z=z, new_k=jnp.zeros((batch, m, h, dk), dtype),
            new_v=jnp.zeros((batch, m, h, dv), dtype), new_log_decay=log_decay, new_beta=beta,
            max_new_tokens=m)

    def _chunked(self, q: Array, k: Array, v: Array, *, chunk_size: int,
                 **kwargs: Any) -> tuple[Array, Array]:
        """The chunked form: ``linear_attention_chunked`` (impl "xla") or the Pallas kernel."""
        if self.impl == "xla":
            return linear_attention_chunked(q, k, v, chunk_size=chunk_size, **kwargs)
        from effx.pallas_kernels import linear_attention as kernel
        kwargs.pop("beta", None)  # None: the kernel has no delta rule (checked in __post_init__)
        if jnp.dtype(self.dtype).itemsize == 2:  # 16-bit compute: the kernel's matmul operands
            q, k, v = (a.astype(self.dtype) for a in (q, k, v))
        blocks = kernel.BlockSizes(chunk_size=chunk_size, sub_chunk=_sub_chunk_size(chunk_size))
        return kernel.linear_attention(q, k, v, block_sizes=blocks, impl="pallas", **kwargs)

    # ---- features ----
    def _features(self, x: Array) -> tuple[Array, Array, Array, Array | None, Array | None]:
        """Projects x ``[B, T, E]`` to (φ(q), φ(k) ``[B,T,H,d_φ]``, v ``[B,T,H,d_v]``, log
        decay, β) with the core inputs in float32."""
        h, dk, dv = self.num_heads, self.key_dim, self.head_dim
        dense = lambda feats, names, name: _dense(feats, -1, names, self.dtype,
                                                  self.param_dtype, name)
        q = dense((h, dk), ("embed", "heads", "head_dim"), "q")(x)
        k = dense((h, dk), ("embed", "heads", "head_dim"), "k")(x)
        v = dense((h, dv), ("embed", "heads", "head_dim"), "v")(x)
        fmap = FeatureMap(self.feature_map, self.num_random_features)
        projection = None
        if fmap.needs_projection:
            m = fmap.random_features(dk)
            draw = lambda: orthogonal_random_matrix(
                jax.random.PRNGKey(self.performer_seed), m, dk)
            if (self.is_mutable_collection("constants")
                    or self.has_variable("constants", "performer_projection")):
                projection = self.variable("constants", "performer_projection", draw).value
            else:  # collection not carried (e.g. a layer scan): the same matrix, redrawn
                projection = draw()
        qf = fmap(q.astype(jnp.float32), projection)
        kf = fmap(k.astype(jnp.float32), projection)
        v = v.astype(jnp.float32)
        log_decay = beta = None
        if self.decay == "delta":
            qf, kf = _l2_normalize(qf), _l2_normalize(kf)
            beta = jax.nn.sigmoid(
                dense((h,), ("embed", "heads"), "beta")(x).astype(jnp.float32))
        elif self.decay == "retnet":
            log_decay = jnp.broadcast_to(jnp.asarray(_retnet_log_decay(h)), q.shape[:3])
        elif self.decay == "gla":
            d_phi = self.feature_dim
            low = dense((self.gate_rank,), ("embed", None), "gate_down")(x)
            up = dense((h, d_phi), (None, "heads", "head_dim"), "gate_up")(low)
            bias = self.param("gate_bias", nn.with_logical_partitioning(
                nn.initializers.zeros, ("heads", "head_dim")), (h, d_phi), self.param_dtype)
            logits = (up + bias.astype(up.dtype)).astype(jnp.float32)
            log_decay = jax.nn.log_sigmoid(logits) / self.gate_logit_normalizer
        return qf, kf, v, log_decay, beta

    @nn.compact
    def __call__(self, x: Array, positions: Array, *, segment_ids: Array | None = None,
                 cache: LinearAttentionCache | None = None,
                 new_token_mask: Array | None = None,
                 ) -> tuple[Array, LinearAttentionCache | None]:
        """``x: [B, T, embed]`` -> ``(y: [B, T, embed] (dtype), cache or None)``; see class doc."""
        _check_layer_inputs("LinearAttention", x, positions)
        del positions
        b, t, embed = x.shape
        if (cache is None and self.form == "chunked" and self.stream_block is not None
                and t > self.stream_block):
            return self._streamed(x, segment_ids), None
        qf, kf, v, log_decay, beta = self._features(x)
        v_in = self._with_ones(v)
        kwargs = dict(log_decay=log_decay, beta=beta, segment_ids=segment_ids)
        new_cache = None
        if cache is None:
            if self.form == "chunked":
                y, _ = self._chunked(qf, kf, v_in, chunk_size=self.chunk_size, **kwargs)
            else:
                y, _ = linear_attention(qf, kf, v_in, form=self.form,
                                        chunk_size=self.chunk_size, **kwargs)
        else:
            if segment_ids is not None:  # with a cache: 0 = padding, a no-op for the state
                valid = (segment_ids != 0)[:, :, None]
                kf, v_in, v = kf * valid[..., None], v_in * valid[..., None], v * valid[..., None]
                if log_decay is not None:
                    log_decay = log_decay * (valid if log_decay.ndim == 3 else valid[..., None])
                if beta is not None:
                    beta = beta * valid
                kwargs = dict(log_decay=log_decay, beta=beta)
            s0 = cache.state
            if self.use_denominator:
                s0 = jnp.concatenate([cache.state, cache.z[..., None]], axis=-1)
            s0 = s0.astype(jnp.float32)
            if new_token_mask is not None:
                y, s = linear_attention_parallel(qf, kf, v_in, initial_state=s0,
                                                 mask=new_token_mask.astype(bool), **kwargs)
            elif t == 1:
                y, s = linear_attention_recurrent(qf, kf, v_in, initial_state=s0, **kwargs)
            else:
                y, s = self._chunked(qf, kf, v_in, initial_state=s0,
                                     chunk_size=min(self.chunk_size, t), **kwargs)
            dv, m, cdt = self.head_dim, cache.max_new_tokens, cache.state.dtype
            new_cache = cache.replace(
                state=s[..., :dv].astype(cdt),
                z=s[..., dv].astype(cdt) if self.use_denominator else None,
                length=cache.length + t, prev_state=cache.state, prev_z=cache.z,
                new_k=_pad_to(kf, m).astype(cdt), new_v=_pad_to(v, m).astype(cdt),
                new_log_decay=None if log_decay is None else _pad_to(log_decay, m).astype(cdt),
                new_beta=None if beta is None else _pad_to(beta, m).astype(cdt))
        return self._output(y, embed), new_cache

    def _with_ones(self, v: Array) -> Array:
        """``v [B, T, H, d_v]``, with a ones column appended when the denominator is used."""
        if not self.use_denominator:
            return v
        return jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)

    def _output(self, y: Array, embed: int) -> Array:
        """Core output ``[B, T, H, d_v (+1)]`` -> ``[B, T, embed]``: denominator, norm, ``o``."""
        if self.use_denominator:
            y = y[..., :-1] / (y[..., -1:] + self.eps)
        if self.output_norm:
            scale = self.param("norm_scale", nn.with_logical_partitioning(
                nn.initializers.ones, ("head_dim",)), (self.head_dim,), self.param_dtype)
            y = _rms_norm(y, scale, self.eps)
        y = y.astype(self.dtype)
        return _dense((embed,), (-2, -1), ("heads", "head_dim", "embed"), self.dtype,
                      self.param_dtype, "o")(y)

    def _streamed(self, x: Array, segment_ids: Array | None) -> Array:
        """The chunked form over blocks of ``stream_block`` tokens, one block at a time.

        A ``nn.scan`` over blocks carries the float32 state ``[B, H, d_φ, d_v (+1)]`` and runs
        the whole layer (projections, features, chunked core, output) per block, so the working
        set is that of one block however long the sequence: time stays linear in T once the
        full-sequence tensors would outgrow the CPU caches (and peak memory is per block). Same
        parameters and (up to float rounding) the same result as the unstreamed chunked form.
        ``x: [B, T, embed]``, ``segment_ids`` int ``[B, T]`` or None -> ``[B, T, embed]``.
        """
        b, t, embed = x.shape
        size = self.stream_block
        n = -(-t // size)
        seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
        pad = n * size - t  # trailing padding: causal, so it never reaches a real token
        x = jnp.pad(x, [(0, 0), (0, pad), (0, 0)])
        seg = jnp.pad(seg, [(0, 0), (0, pad)], mode="edge")
        blocks = lambda a: jnp.moveaxis(a.reshape((b, n, size) + a.shape[2:]), 1, 0)
        dv = self.head_dim + int(self.use_denominator)
        s0 = jnp.zeros((b, self.num_heads, self.feature_dim, dv), jnp.float32)

        def step(mdl: "LinearAttention", carry: tuple[Array, Array], inputs: tuple[Array, Array]
                 ) -> tuple[tuple[Array, Array], Array]:
            state, last_seg = carry
            xb, segb = inputs
            qf, kf, v, log_decay, beta = mdl._features(xb)
            same_doc = (segb[:, 0] == last_seg)[:, None, None, None]
            y, state = mdl._chunked(qf, kf, mdl._with_ones(v), chunk_size=mdl.chunk_size,
                                    log_decay=log_decay, beta=beta, segment_ids=segb,
                                    initial_state=jnp.where(same_doc, state, 0.0))
            return (state, segb[:, -1]), mdl._output(y, embed)

        scan = nn.scan(step, variable_broadcast=("params", "constants"),
                       split_rngs={"params": False})
        _, ys = scan(self, (s0, seg[:, 0]), (blocks(x), blocks(seg)))
        return jnp.moveaxis(ys, 0, 1).reshape(b, n * size, embed)[:, :t]


# --------------------------------------------------------------------------------------------
# Sliding-window softmax attention (self-contained, for the Based hybrid).
# --------------------------------------------------------------------------------------------


def _rope(x: Array, positions: Array, base: float) -> Array:
    """Rotary embedding (rotate-half) of ``x: [B, T, H, D]`` at int ``positions [B, T]``."""
    half = x.shape[-1] // 2
    freq = base ** (-np.arange(half, dtype=np.float32) / half)
    angle = positions.astype(jnp.float32)[..., None] * freq  # [B, T, half]
    sin, cos = jnp.sin(angle)[:, :, None], jnp.cos(angle)[:, :, None]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def _masked_softmax_av(scores: Array, valid: Array, v: Array, spec: str) -> Array:
    """Softmax over the last axis of ``scores`` where ``valid`` (rows with no valid key -> 0),
    then contract with ``v`` by einsum ``spec``."""
    neg = jnp.finfo(scores.dtype).min
    scores = jnp.where(valid, scores, neg)
    p = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    p = jnp.where(valid, p, 0.0)
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), jnp.finfo(p.dtype).tiny)
    return jnp.einsum(spec, p, v)


def sliding_window_attention(q: Array, k: Array, v: Array, *, window: int,
                             segment_ids: Array | None = None) -> Array:
    """Causal softmax attention over the last ``window`` tokens (self included), blocked so that
    time and memory are ``O(T·window)``.

    Args:
      q, k, v: ``[B, T, H, D]`` (positional encoding already applied).
      window: keys ``j`` with ``i - window < j ≤ i`` are visible (same document only).
      segment_ids: int ``[B, T]`` or ``None``.

    Returns:
      ``[B, T, H, D]`` in float32 or wider.
    """
    if window <= 0:
        raise ValueError(f"window={window}: must be > 0")
    b, t, h, d = q.shape
    cdt = _compute_dtype(q, k, v)
    w = window
    n = -(-t // w)
    pad = n * w - t
    doc = _doc_ids(segment_ids, b, t)
    padw = lambda x: jnp.pad(x.astype(cdt), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    qb = padw(q).reshape(b, n, w, h, d)
    kp, vp = padw(k), padw(v)
    docp = jnp.pad(doc, [(0, 0), (0, pad)], constant_values=-1).reshape(b, n, w)
    # keys of block i are blocks i-1 and i
    kprev = jnp.concatenate([jnp.zeros_like(kp[:, :w]), kp[:, :-w]], 1).reshape(b, n, w, h, d)
    vprev = jnp.concatenate([jnp.zeros_like(vp[:, :w]), vp[:, :-w]], 1).reshape(b, n, w, h, d)
    kb = jnp.concatenate([kprev, kp.reshape(b, n, w, h, d)], axis=2)  # [B, N, 2W, H, D]
    vb = jnp.concatenate([vprev, vp.reshape(b, n, w, h, d)], axis=2)
    dprev = jnp.concatenate([jnp.full((b, 1, w), -1), docp[:, :-1]], axis=1)
    dk = jnp.concatenate([dprev, docp], axis=2)  # [B, N, 2W]
    qi = np.arange(w)[:, None] + w
    kj = np.arange(2 * w)[None, :]
    valid = (kj <= qi) & (qi - kj < w)  # [W, 2W]
    valid = valid & (docp[..., :, None] == dk[..., None, :]) & (dk[..., None, :] >= 0)
    scores = jnp.einsum("bnihd,bnjhd->bnhij", qb, kb) * (d ** -0.5)
    y = _masked_softmax_av(scores, valid[:, :, None], vb, "bnhij,bnjhd->bnihd")
    return y.reshape(b, n * w, h, d)[:, :t]


@flax.struct.dataclass
class WindowKVCache:
    """Ring-buffer KV cache of ``SlidingWindowAttention``.

    Attributes:
      k, v: ``[B, R, H, D]`` with ``R = window + max_new_tokens``; token number n (0-based in
        the sequence) lives in slot ``n % R`` (keys stored after rotary). ``R`` exceeds the
        window by the largest call, so a verification call never overwrites a key that the
        accepted path still needs.
      length: int32 ``[B]`` tokens written so far.
      window: static window size.
    """

    k: Array
    v: Array
    length: Array
    window: int = flax.struct.field(pytree_node=False, default=64)

    def commit(self, start: Array, accepted: Array, num_accepted: Array) -> "WindowKVCache":
        """Move the accepted new tokens (written at slots ``(start + j) % R``) to the slots of
        sequential decoding ``(start + i) % R``; ``length = start + num_accepted``.
        Args as ``LinearAttentionCache.commit``."""
        r = self.k.shape[1]
        a = accepted.shape[1]
        src = (start[:, None] + accepted) % r  # [B, A]
        dst = (start[:, None] + jnp.arange(a)[None, :]) % r
        dst = jnp.where(jnp.arange(a)[None, :] < num_accepted[:, None], dst, r)  # r: dropped

        def move(buf: Array) -> Array:
            rows = jax.vmap(lambda bb, ss: bb[ss])(buf, src)  # all reads before any write
            return jax.vmap(lambda bb, dd, rr: bb.at[dd].set(rr, mode="drop"))(buf, dst, rows)

        return self.replace(k=move(self.k), v=move(self.v),
                            length=(start + num_accepted).astype(jnp.int32))


class SlidingWindowAttention(nn.Module):
    """Causal softmax attention over the last ``window`` tokens with rotary positions.

    Same interface as ``LinearAttention``: ``y, cache = attn(x, positions, *, segment_ids=None,
    cache=None, new_token_mask=None)``, ``x: [B, T, embed]``, ``positions`` int32 ``[B, T]``
    (rotary angles). Without a cache the blocked ``O(T·window)`` form is used. With a cache
    (``WindowKVCache``, ring of ``window + max_new_tokens`` slots) query i sees old token n iff
    ``length + depth_i - n < window`` and new token j iff ``new_token_mask[b, i, j]`` and
    ``depth_i - depth_j < window``, where ``depth_i`` = number of ancestors (causal default:
    ``depth_i = i``); the new keys are written at slots ``(length + j) % R`` (a call with
    T > R keeps only its last R tokens). With a cache the new-token part is dense, ``O(T²)``,
    and ``segment_ids`` only marks padding (id 0: neither written nor attended to).
    Parameters: q, k, v ``[embed, heads, head_dim]``, o ``[heads, head_dim, embed]``.
    """

    num_heads: int
    head_dim: int
    window: int = 64
    max_new_tokens: int = 64
    rope_base: float = 10_000.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        for name in ("num_heads", "head_dim", "window", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name}={value!r}: must be a positive int")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim}: must be even (rotary)")
        if not self.rope_base > 0:
            raise ValueError(f"rope_base={self.rope_base!r}: must be > 0")
        super().__post_init__()

    def init_cache(self, batch: int, max_len: int, dtype: Dtype = jnp.float32, *,
                   embed_dim: int | None = None) -> WindowKVCache:
        """Empty ring cache; ``max_len`` is unused (the ring has ``window + max_new_tokens``
        slots)."""
        del max_len
        shape = (batch, self.window + self.max_new_tokens, self.num_heads, self.head_dim)
        return WindowKVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                             length=jnp.zeros((batch,), jnp.int32), window=self.window)

    @nn.compact
    def __call__(self, x: Array, positions: Array, *, segment_ids: Array | None = None,
                 cache: WindowKVCache | None = None, new_token_mask: Array | None = None,
                 ) -> tuple[Array, WindowKVCache | None]:
        """``x: [B, T, embed]`` -> ``(y: [B, T, embed] (dtype), cache or None)``."""
        _check_layer_inputs("SlidingWindowAttention", x, positions)
        b, t, embed = x.shape
        h, d, w = self.num_heads, self.head_dim, self.window
        dense = lambda name: _dense((h, d), -1, ("embed", "heads", "head_dim"), self.dtype,
                                    self.param_dtype, name)
        q = _rope(dense("q")(x), positions, self.rope_base)
        k = _rope(dense("k")(x), positions, self.rope_base)
        v = dense("v")(x)
        new_cache = None
        if cache is None:
            y = sliding_window_attention(q, k, v, window=w, segment_ids=segment_ids)
        else:
            r = cache.k.shape[1]
            start = cache.length
            mask = (jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
                    if new_token_mask is None else new_token_mask.astype(bool))
            depth = jnp.sum(mask, axis=-1) - 1  # [B, T]
            slot = jnp.arange(r)[None, :]
            n_old = slot + r * jnp.floor_divide(start[:, None] - 1 - slot, r)  # [B, R]
            qpos = start[:, None] + depth  # sequence index of each query, [B, T]
            valid_old = (n_old[:, None, :] >= 0) & (qpos[:, :, None] - n_old[:, None, :] < w)
            valid_new = mask & (depth[:, :, None] - depth[:, None, :] < w)
            real = jnp.ones((b, t), bool) if segment_ids is None else segment_ids != 0
            valid_new = valid_new & real[:, None, :]
            valid = jnp.concatenate([valid_old, valid_new], axis=-1)[:, None]  # [B,1,T,R+T]
            cdt = _compute_dtype(q, cache.k)
            keys = jnp.concatenate([cache.k.astype(cdt), k.astype(cdt)], axis=1)
            vals = jnp.concatenate([cache.v.astype(cdt), v.astype(cdt)], axis=1)
            scores = jnp.einsum("bihd,bjhd->bhij", q.astype(cdt), keys) * (d ** -0.5)
            y = _masked_softmax_av(scores, valid, vals, "bhij,bjhd->bihd")
            j = jnp.arange(t)[None, :]
            n_real = jnp.sum(real, axis=1, keepdims=True)  # padding comes last
            dst = jnp.where((j >= n_real - r) & real, (start[:, None] + j) % r, r)  # r: dropped
            write = lambda buf, new: jax.vmap(
                lambda bb, dd, nn_: bb.at[dd].set(nn_.astype(bb.dtype), mode="drop"))(
                    buf, dst, new)
            new_cache = cache.replace(k=write(cache.k, k), v=write(cache.v, v),
                                      length=cache.length + t)
        y = y.astype(self.dtype)
        out = _dense((embed,), (-2, -1), ("heads", "head_dim", "embed"), self.dtype,
                     self.param_dtype, "o")(y)
        return out, new_cache


# --------------------------------------------------------------------------------------------
# Based: Taylor linear attention + sliding-window softmax attention in one layer.
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class BasedCache:
    """Cache of ``BasedAttention``: the two parts' caches and the authoritative ``length``
    (int32 ``[B]``; it overrides the parts' own lengths on every call)."""

    linear: LinearAttentionCache
    window: WindowKVCache
    length: Array

    def commit(self, start: Array, accepted: Array, num_accepted: Array) -> "BasedCache":
        """Commit both parts (args as ``LinearAttentionCache.commit``)."""
        lin = self.linear.commit(start, accepted, num_accepted)
        win = self.window.commit(start, accepted, num_accepted)
        return BasedCache(linear=lin, window=win, length=lin.length)


def _based_linear_kwargs(m: "BasedAttention") -> dict[str, Any]:
    return dict(num_heads=m.num_heads, head_dim=m.head_dim, qk_dim=m.feature_dim,
                feature_map="taylor", decay="none", use_denominator=m.use_denominator,
                output_norm=m.output_norm, form=m.form, chunk_size=m.chunk_size,
                stream_block=m.stream_block, max_new_tokens=m.max_new_tokens, dtype=m.dtype, param_dtype=m.param_dtype)


def _based_window_kwargs(m: "BasedAttention") -> dict[str, Any]:
    return dict(num_heads=m.num_heads, head_dim=m.head_dim, window=m.window,
                max_new_tokens=m.max_new_tokens, rope_base=m.rope_base, dtype=m.dtype,
                param_dtype=m.param_dtype)


class BasedAttention(nn.Module):
    """Based (Arora et al. 2024) in one layer: ``y = LinearAttention(taylor) + SlidingWindow``.

    The linear part projects q/k to ``feature_dim`` (16) per head, applies the 2nd-order Taylor
    map (d_φ = 1 + f + f²) and the φ(q)ᵀz denominator (``use_denominator``), no decay; the
    window part is causal softmax attention with rotary positions over the last ``window``
    tokens. The two outputs (each with its own projections) are summed. Interface, shapes and
    call patterns as ``LinearAttention``; cache ``BasedCache``. ``stream_block`` applies to the
    linear part (see ``LinearAttention``).
    """

    num_heads: int
    head_dim: int
    feature_dim: int = 16
    window: int = 64
    use_denominator: bool = True
    output_norm: bool = False
    form: str = "chunked"
    chunk_size: int = 64
    stream_block: int | None = 1024
    max_new_tokens: int = 64
    rope_base: float = 10_000.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        if not isinstance(self.feature_dim, (int, np.integer)) or self.feature_dim <= 0:
            raise ValueError(f"feature_dim={self.feature_dim!r}: must be a positive int")
        LinearAttention(**_based_linear_kwargs(self), parent=None)  # validates the rest
        SlidingWindowAttention(**_based_window_kwargs(self), parent=None)
        super().__post_init__()

    def init_cache(self, batch: int, max_len: int, dtype: Dtype = jnp.float32, *,
                   embed_dim: int | None = None) -> BasedCache:
        """Empty caches of both parts (length 0)."""
        lin = LinearAttention(**_based_linear_kwargs(self), parent=None)
        win = SlidingWindowAttention(**_based_window_kwargs(self), parent=None)
        return BasedCache(linear=lin.init_cache(batch, max_len, dtype),
                          window=win.init_cache(batch, max_len, dtype),
                          length=jnp.zeros((batch,), jnp.int32))

    @nn.compact
    def __call__(self, x: Array, positions: Array, *, segment_ids: Array | None = None,
                 cache: BasedCache | None = None, new_token_mask: Array | None = None,
                 ) -> tuple[Array, BasedCache | None]:
        """``x: [B, T, embed]`` -> ``(y: [B, T, embed] (dtype), cache or None)``."""
        lin = LinearAttention(**_based_linear_kwargs(self), name="linear")
        win = SlidingWindowAttention(**_based_window_kwargs(self), name="window")
        kw = dict(segment_ids=segment_ids, new_token_mask=new_token_mask)
        if cache is None:
            y1, _ = lin(x, positions, **kw)
            y2, _ = win(x, positions, **kw)
            return y1 + y2, None
        y1, c1 = lin(x, positions, cache=cache.linear.replace(length=cache.length), **kw)
        y2, c2 = win(x, positions, cache=cache.window.replace(length=cache.length), **kw)
        return y1 + y2, BasedCache(linear=c1, window=c2, length=cache.length + x.shape[1])
