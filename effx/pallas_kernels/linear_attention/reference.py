"""Pure-jnp (XLA) chunked causal linear attention with the kernels' exact semantics.

Inputs are already feature-mapped (φ applied by the caller; the Based Taylor map, elu+1, ...
are just inputs here): ``q, k: [batch, T, heads, d_k]``, ``v: [batch, T, heads, d_v]``.
Per (batch, head) the state ``S: [d_k, d_v]`` obeys::

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ        y_t = S_tᵀ q_t   (token t included)

with the log-decay ``g_t <= 0`` of the decay kind (``decay_kind``):

* ``"none"``: ``log_decay=None`` (g = 0);
* ``"retnet"``: one scalar per head, ``log_decay: [heads]`` (RetNet's log γ_h), or one scalar
  per head and token, ``[batch, T, heads]`` (any data-dependent scalar gate);
* ``"gla"``: per-token per-channel log-gates ``[batch, T, heads, d_k]`` (GLA's log α_t).

``segment_ids`` (int ``[batch, T]``): a document starts wherever the id changes and the state
is reset there, so packed documents never interact. ``initial_state: [batch, heads, d_k, d_v]``
is the state before token 0 (it belongs to the first token's document). Returns
``(y: [batch, T, heads, d_v] in v's dtype, final state [batch, heads, d_k, d_v] float32)``.

These are the semantics of ``effx.attention.linear`` (its parallel/chunked/recurrent forms,
decays "none"/"retnet"/"gla"); the tests check both. ``linear_attention_reference`` is the
chunked form (the XLA fallback of the entry point: ``O(T·C·d + T·d²)``; diagonal gates use
sub-chunks whose exponents are all ``<= 0``, so any gate strength is stable);
``linear_attention_recurrent`` is the token-by-token scan (the definition, ``O(T·d²)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DECAY_KINDS = ("none", "retnet", "gla")


def decay_kind(q, log_decay) -> str:
  """The decay kind of a ``log_decay`` argument (validated against q ``[B, T, H, d_k]``)."""
  if log_decay is None:
    return "none"
  b, t, h, dk = q.shape
  if log_decay.shape in ((h,), (b, t, h)):
    return "retnet"
  if log_decay.shape == (b, t, h, dk):
    return "gla"
  raise ValueError(f"log_decay shape {log_decay.shape}: must be None, [heads]={(h,)}, "
                   f"[batch, T, heads]={(b, t, h)} or [batch, T, heads, d_k]={(b, t, h, dk)}")


def check_inputs(q, k, v, log_decay=None, segment_ids=None, initial_state=None) -> str:
  """Validates shapes (one-line ValueErrors); returns the decay kind."""
  if q.ndim != 4 or k.shape != q.shape:
    raise ValueError(f"q/k shapes {q.shape}/{k.shape}: both must be [batch, T, heads, d_k]")
  if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"v shape {v.shape}: must be [batch, T, heads, d_v] with q {q.shape}")
  if segment_ids is not None and segment_ids.shape != q.shape[:2]:
    raise ValueError(f"segment_ids shape {segment_ids.shape}: must be {q.shape[:2]}")
  b, _, h, dk = q.shape
  want = (b, h, dk, v.shape[-1])
  if initial_state is not None and initial_state.shape != want:
    raise ValueError(f"initial_state shape {initial_state.shape}: must be {want}")
  return decay_kind(q, log_decay)


def doc_ids(segment_ids, batch: int, length: int):
  """int32 ``[B, T]`` document index: 0 for the first document, +1 at every change of id."""
  if segment_ids is None:
    return jnp.zeros((batch, length), jnp.int32)
  change = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
  return jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), jnp.cumsum(change, axis=1)], 1)


def per_token_log_decay(log_decay, batch: int, length: int):
  """``[H]`` -> ``[B, T, H]`` (differentiable broadcast); other shapes unchanged."""
  if log_decay is not None and log_decay.ndim == 1:
    return jnp.broadcast_to(log_decay[None, None, :], (batch, length) + log_decay.shape)
  return log_decay


def _exp_masked(x, mask):
  """exp(x) where mask else 0, with no overflow or NaN gradient from the masked entries."""
  return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def _to_chunks(x, c: int):
  """[B, N*C, H, ...] -> [B, H, N, C, ...]."""
  b, tp, h = x.shape[:3]
  return jnp.moveaxis(x.reshape((b, tp // c, c, h) + x.shape[3:]), 3, 1)


def _from_chunks(x):
  """[B, H, N, C, ...] -> [B, N*C, H, ...]."""
  x = jnp.moveaxis(x, 1, 3)
  b, n, c, h = x.shape[:4]
  return x.reshape((b, n * c, h) + x.shape[4:])


def _gla_intra_chunk(q, k, gcum, sub: int):
  """``A[i, j] = Σ_d q_id k_jd exp(G_id - G_jd)`` for ``j <= i`` (junk above, masked later).

  ``q, k, gcum: [..., C, d_k]``, gcum the in-chunk cumulative log gates. Pairs in earlier
  sub-chunks (of ``sub`` tokens) factor through the end of the previous sub-chunk (both factors
  ``<= 1``); pairs in the same sub-chunk use the ``[sub, sub, d_k]`` tensor.
  """
  *lead, big_c, dk = q.shape
  c = sub
  ns = big_c // c
  qs, ks, gs = (x.reshape(*lead, ns, c, dk) for x in (q, k, gcum))
  gref = jnp.concatenate([jnp.zeros_like(gs[..., :1, -1, :]), gs[..., :-1, -1, :]], axis=-2)
  q_scaled = qs * jnp.exp(gs - gref[..., None, :])
  valid = (np.arange(big_c)[None, :] < (np.arange(ns) * c)[:, None])[..., None]  # [ns, C, 1]
  k_scaled = k[..., None, :, :] * _exp_masked(gref[..., :, None, :] - gcum[..., None, :, :],
                                              valid)
  inter = jnp.einsum("...pid,...pjd->...pij", q_scaled, k_scaled).reshape(*lead, big_c, big_c)
  tri = np.tril(np.ones((c, c), bool))[..., None]
  dec = _exp_masked(gs[..., :, None, :] - gs[..., None, :, :], tri)
  intra = jnp.einsum("...pid,...pjd,...pijd->...pij", qs, ks, dec)
  block_diag = jnp.einsum("...pij,pr->...pirj", intra, jnp.eye(ns, dtype=intra.dtype))
  return inter + block_diag.reshape(*lead, big_c, big_c)


def linear_attention_reference(q, k, v, *, log_decay=None, segment_ids=None,
                               initial_state=None, chunk_size: int = 64, sub_chunk: int = 16):
  """Chunked causal linear attention (module docstring), pure jnp, differentiable.

  Args:
    q, k: ``[B, T, H, d_k]`` features; v: ``[B, T, H, d_v]``.
    log_decay: None, ``[H]``, ``[B, T, H]`` or ``[B, T, H, d_k]`` (entries ``<= 0``).
    segment_ids: int ``[B, T]`` or None. initial_state: ``[B, H, d_k, d_v]`` or None.
    chunk_size: C (T need not be a multiple: the tail is zero-padded).
    sub_chunk: GLA sub-chunk (must divide ``chunk_size``).

  Returns:
    ``(y [B, T, H, d_v] in v's dtype, state [B, H, d_k, d_v] float32)``.
  """
  kind = check_inputs(q, k, v, log_decay, segment_ids, initial_state)
  if chunk_size <= 0 or sub_chunk <= 0 or chunk_size % sub_chunk:
    raise ValueError(f"chunk_size={chunk_size}, sub_chunk={sub_chunk}: must be > 0 and "
                     f"sub_chunk must divide chunk_size")
  out_dtype = v.dtype
  cdt = jnp.float32
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  c = chunk_size
  n = -(-t // c)
  pad = n * c - t
  log_decay = per_token_log_decay(log_decay, b, t)
  doc = doc_ids(segment_ids, b, t)
  if pad:
    zpad = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    q, k, v = zpad(q), zpad(k), zpad(v)
    log_decay = None if log_decay is None else zpad(log_decay)
    doc = jnp.pad(doc, [(0, 0), (0, pad)], mode="edge")   # padding continues the last doc
  doc = doc.reshape(b, n, c)
  qc, kc, vc = (_to_chunks(x.astype(cdt), c) for x in (q, k, v))  # [B, H, N, C, ·]
  causal = np.tril(np.ones((c, c), bool))
  allowed = (causal & (doc[..., :, None] == doc[..., None, :]))[:, None]  # [B, 1, N, C, C]
  doc_prev = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), doc[:, :-1, -1]], axis=1)
  m = (doc == doc_prev[..., None])[:, None].astype(cdt)   # sees the carried state [B,1,N,C]
  l = (doc == doc[..., -1:])[:, None].astype(cdt)         # reaches the chunk's end state
  keep = m[..., -1]                                        # carried state survives [B, 1, N]
  s0 = jnp.zeros((b, h, dk, dv), cdt) if initial_state is None else initial_state.astype(cdt)

  if kind == "none":
    scores = jnp.einsum("bhncd,bhnsd->bhncs", qc, kc)
    q_in, k_out = qc, kc
    chunk_decay = jnp.ones((1, 1, n, 1, 1), cdt)
  elif kind == "retnet":
    gc = jnp.cumsum(_to_chunks(log_decay.astype(cdt), c), axis=-1)  # [B, H, N, C]
    diff = gc[..., :, None] - gc[..., None, :]
    scores = jnp.einsum("bhncd,bhnsd->bhncs", qc, kc) * _exp_masked(diff, allowed)
    q_in = qc * jnp.exp(gc)[..., None]
    k_out = kc * jnp.exp(gc[..., -1:] - gc)[..., None]
    chunk_decay = jnp.exp(gc[..., -1])[..., None, None]
  else:
    gc = jnp.cumsum(_to_chunks(log_decay.astype(cdt), c), axis=-2)  # [B, H, N, C, dk]
    scores = _gla_intra_chunk(qc, kc, gc, sub_chunk)
    q_in = qc * jnp.exp(gc)
    k_out = kc * jnp.exp(gc[..., -1:, :] - gc)
    chunk_decay = jnp.exp(gc[..., -1, :])[..., None]  # [B, H, N, dk, 1]
  scores = jnp.where(allowed, scores, 0.0)
  y = jnp.einsum("bhncs,bhnse->bhnce", scores, vc)
  ds = jnp.einsum("bhncd,bhnce->bhnde", k_out * l[..., None], vc)  # [B, H, N, dk, dv]
  chunk_decay = jnp.broadcast_to(chunk_decay * keep[..., None, None],
                                 (b, h, n) + chunk_decay.shape[3:])

  def body(s, xs):
    a_n, ds_n = xs
    return a_n * s + ds_n, s

  state, s_prev = jax.lax.scan(body, s0, (jnp.moveaxis(chunk_decay, 2, 0),
                                          jnp.moveaxis(ds, 2, 0)))
  s_prev = jnp.moveaxis(s_prev, 0, 2)  # [B, H, N, dk, dv]
  y = y + jnp.einsum("bhncd,bhnde->bhnce", q_in * m[..., None], s_prev)
  return _from_chunks(y)[:, :t].astype(out_dtype), state


def linear_attention_recurrent(q, k, v, *, log_decay=None, segment_ids=None,
                               initial_state=None):
  """Token-by-token ``lax.scan`` (the definition); same arguments/results as the chunked form."""
  kind = check_inputs(q, k, v, log_decay, segment_ids, initial_state)
  out_dtype = v.dtype
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  doc = doc_ids(segment_ids, b, t)
  reset = jnp.concatenate([jnp.zeros((b, 1), bool), doc[:, 1:] != doc[:, :-1]], axis=1)
  g = per_token_log_decay(log_decay, b, t)
  if g is None:
    g = jnp.zeros((b, t, h), jnp.float32)
  g = g.astype(jnp.float32)
  if kind != "gla":
    g = g[..., None]
  s0 = (jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))

  def body(s, xs):
    q_t, k_t, v_t, g_t, r_t = xs
    s = jnp.where(r_t[:, None, None, None], 0.0, s) * jnp.exp(g_t)[..., None]
    s = s + k_t[..., :, None] * v_t[..., None, :]
    return s, jnp.einsum("bhd,bhde->bhe", q_t, s)

  tfirst = lambda x: jnp.moveaxis(x.astype(jnp.float32), 1, 0)
  state, y = jax.lax.scan(body, s0, (tfirst(q), tfirst(k), tfirst(v), tfirst(g),
                                     jnp.moveaxis(reset, 1, 0)))
  return jnp.moveaxis(y, 0, 1).astype(out_dtype), state
