"""Chunked causal linear attention for Hopper GPUs (Pallas Mosaic GPU, ``plgpu``), fwd + bwd.

Layout: q/k/v stay ``[batch, T_p, heads, d]`` (T padded to a multiple of the chunk C = 64, d_k
and d_v to multiples of 64 with zeros, which change nothing). One CTA (one warpgroup) owns one
(batch, head, 64-wide d_v tile, d_k tile) and walks the chunks sequentially; its state tile
``S_r: [d_k tile, 64]`` stays in registers (float32, WGMMA layout) across chunks. The d_k tile
is the whole padded d_k up to 128, else 128 or 64 rows (``_k_tile``: Based's Taylor features,
d_k = 273 -> 320, run five 64-row tiles). Everything is linear in the d_k split
(``Q Kᵀ = Σ_r Q_r K_rᵀ``, the masks are elementwise), so each CTA computes its tile's share of
y (and of dV) and XLA adds the float32 partials; registers and shared memory per CTA stay
those of d_k <= 128. Every matmul is a WGMMA with bf16/f16 operands and float32
accumulation; the inputs of chunk n+1 are fetched by
TMA into the other half of a two-slot shared-memory ring while chunk n computes.

Per chunk (XLA prepares per-token float32 vectors, see ``_prepare``; ``b`` = in-chunk
cumulative log-decay in base 2, ``rq = e^{b}·m``, ``rk = e^{b_C - b}·l``, ``a = e^{b_C}·keep``
with m/l/keep the segment masks of ``tpu.py``):

* forward: ``A = (Q Kᵀ) ⊙ 2^{b_i - b_j} [j <= i, same doc]``, ``y = A V + rq ⊙ (Q S)``,
  ``S <- a·S + Kᵀ (rk ⊙ V)``. The state before each chunk is the matmul operand of ``Q S``
  (bf16 in shared memory); the backward's residual is exactly that tile, written out by TMA
  (``[B, H, N, d_k, d_v]``), so ``y`` and its gradient see the same rounded state.
* backward (chunks in reverse, ``dS`` carried in registers, starting at the final-state
  cotangent): ``dA = (dY Vᵀ) ⊙ D``, ``dV = Aᵀ dY + rk ⊙ (K dS)``, ``dK = dAᵀ Q + rk ⊙ (V dSᵀ)``,
  ``dQ = dA K + rq ⊙ (dY S_prevᵀ)``, ``dS <- a·dS + Qᵀ (rq ⊙ dY)``; A and dA go through shared
  memory so that their transposes are WGMMA operands. dQ and dK are per-d_v-tile partial sums
  (float32 ``[n_v, B, T_p, H, d_k]``) and dV per-d_k-tile ones (``[n_k, ...]``, dY Vᵀ is
  recomputed by every d_k tile) that XLA adds. The decay gradient needs no kernel (as in
  ``tpu.py``): ``dL/dG_t = q_t·dq_t - k_t·dk_t`` (+ the final state's ``Σ S ⊙ dS`` at the last
  token), reverse-cumsummed by XLA.

GLA (per-channel gates ``[B, T, H, d_k]``): the intra-chunk term needs per-channel pair
exponents, so it stays in XLA (``reference.py``'s sub-chunk form, every exponent <= 0, plain
autodiff); the kernels run the inter-chunk recurrence only, on ``q_in = q ⊙ e^{b}·m`` and
``k_out = k ⊙ e^{b_C - b}·l`` (exponents <= 0, prepared by XLA in the inputs' dtype):
``y += q_in S``, ``S <- diag(e^{b_C}·keep) S + k_outᵀ V`` (the per-channel chunk decay is a
per-row scale of the state tile), and in the backward ``dQ_in = dY S_prevᵀ``,
``dK_out = V dSᵀ``, ``dV = K_out dS``, ``dS <- diag(a) dS + Q_inᵀ dY``. Its gate gradient is
the same identity per channel (``q_t ⊙ dq_t - k_t ⊙ dk_t`` over the inter-chunk part).

Supported (``supported`` names the reason otherwise; the entry point then runs XLA): bf16/f16
q/k/v of one dtype, decay kinds "none", "retnet" and "gla", segment ids, an initial state,
``d_k <= 512`` (tested up to 320) and ``d_v`` any size after padding to 64, chunk_size 64.
Not supported: float32 inputs (WGMMA's float32 form is tf32 and has no transposed operands).

Interpret mode (``plgpu.InterpretGPUParams``, CPU) cannot feed WGMMA from registers nor run
``pl.run_state``: there register operands go through shared memory and accumulations are a
fresh accumulator plus an add (as in ``flash_attention/gpu.py``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from effx.pallas_kernels.linear_attention import reference as ref_lib
from effx.pallas_kernels.linear_attention.config import BlockSizes

CHUNK = 64          # tokens per chunk = WGMMA M of one warpgroup
TILE = 64           # d_v tile per CTA and the padding unit of d_k / d_v (128-byte bf16 rows)
MAX_KT = 128        # d_k rows of one CTA's state tile ([d_k tile, 64] float32 in registers)
MAX_DK = 512        # larger d_k runs XLA (tested up to 320: Based's 273 padded)
LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class _Static:
  """Trace-time constants of one kernel call."""
  has_b: bool         # retnet: in-chunk decay mask from the per-token cumulative log-decay
  has_scale: bool     # rq / rk / a present (retnet or segments)
  gla: bool           # per-channel gates: inter-chunk part only (inputs q_in, k_out prescaled)
  has_seg: bool       # document mask inside the chunk
  has_s0: bool
  num_chunks: int
  interpreting: bool


def supported(q, k, v, log_decay=None, block_sizes: BlockSizes | None = None) -> str | None:
  """None if the Mosaic GPU kernels handle this call, else the reason they do not."""
  ref_lib.decay_kind(q, log_decay)
  dt = jnp.dtype(q.dtype)
  if dt not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"dtype {q.dtype} (the Mosaic GPU kernel takes bf16/f16)"
  if k.dtype != dt or v.dtype != dt:
    return f"mixed dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}"
  if _pad64(q.shape[-1]) > MAX_DK:
    return f"d_k {q.shape[-1]} (GPU kernel: <= {MAX_DK})"
  if block_sizes is not None and block_sizes.chunk_size != CHUNK:
    return f"chunk_size {block_sizes.chunk_size} (GPU kernel: {CHUNK})"
  return None


def _pad64(d: int) -> int:
  return -(-d // TILE) * TILE


def _k_tile(dkp: int) -> int:
  """d_k rows per CTA: all of the padded d_k up to 128, else 128 where it divides, else 64."""
  if dkp <= MAX_KT:
    return dkp
  return MAX_KT if dkp % MAX_KT == 0 else TILE


def _grid_ids(nk: int):
  """(vt, kt): the d_v and d_k tile of this CTA from the combined grid axis "vk"."""
  vk = lax.axis_index("vk")
  return lax.div(vk, nk), lax.rem(vk, nk)


def _bf16_tiles():
  return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _f32_tiles():
  return (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))


# ------------------------------------------------------------------------------------------------
# In-kernel helpers
# ------------------------------------------------------------------------------------------------


def _mm(a, b, shape, st: _Static, acc=None):
  """``acc + a @ b`` (float32, WGMMA layout); a, b: shared-memory refs (a may be a value)."""
  if acc is None or st.interpreting:
    def body(ref):
      plgpu.wgmma(ref, a, b)
      return ref[...]

    out = pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))
    return out if acc is None else acc + out

  def body_inplace(ref):
    plgpu.wgmma(ref, a, b)

  return pl.run_state(body_inplace)(plgpu.ACC.init(acc))


def _row(x, shape):
  """Per-row vector (``Layout.WGMMA.reduce(1)``) broadcast over columns."""
  return lax.broadcast_in_dim(x, shape, [0])


def _col(x, shape):
  """Per-column vector (``Layout.WGMMA.reduce(0)``) broadcast over rows."""
  return lax.broadcast_in_dim(x, shape, [1])


def _decay_mask(vec_s, doc_s, slot, st: _Static):
  """``(ok, D)`` for the ``[C, C]`` scores: ok = ``j <= i`` and same document (bool);
  ``D_ij = 2^{b_i - b_j}`` where ok, else 0 (float32; None without decay).

  The row and column views of a vector are loaded from two shared-memory copies: loading one
  ref in both layouts leaves Mosaic GPU's layout inference without a solution (it searches
  for minutes, then fails)."""
  shape = (CHUNK, CHUNK)
  rows = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
  cols = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
  ok = cols <= rows
  if st.has_seg:
    d_r = plgpu.load(doc_s.at[0, slot], layout=plgpu.Layout.WGMMA.reduce(1))
    d_c = plgpu.load(doc_s.at[1, slot], layout=plgpu.Layout.WGMMA.reduce(0))
    ok = jnp.logical_and(ok, _row(d_r, shape) == _col(d_c, shape))
  if not st.has_b:
    return ok, None
  b_r = plgpu.load(vec_s.at[0, slot], layout=plgpu.Layout.WGMMA.reduce(1))
  b_c = plgpu.load(vec_s.at[1, slot], layout=plgpu.Layout.WGMMA.reduce(0))
  diff = jnp.where(ok, _row(b_r, shape) - _col(b_c, shape), 0.0)
  return ok, jnp.where(ok, jnp.exp2(diff), 0.0)


def _apply_mask(x, mask):
  """x ⊙ D (decay) or x where ok (no decay): the masked ``[C, C]`` scores, float32."""
  ok, d = mask
  return jnp.where(ok, x, 0.0) if d is None else x * d


def _scale_vecs(vec_s, slot, st: _Static):
  """``(rq, rk)``: float32 ``[C]`` per-row vectors (``Layout.WGMMA.reduce(1)``) of a slot."""
  n = len(_vec_sources(st))
  return tuple(plgpu.load(vec_s.at[i, slot], layout=plgpu.Layout.WGMMA.reduce(1))
               for i in (n - 2, n - 1))


def _lhs(value, scratch, st: _Static):
  """A bf16 ``[64, 64]`` register value as a WGMMA lhs: itself on hardware, via smem when
  interpreting (interpret mode's WGMMA takes shared-memory operands only)."""
  if not st.interpreting:
    return value
  scratch[...] = value
  plgpu.commit_smem()
  return scratch


def _n_vecs(st: _Static) -> int:
  """Per-token float32 vectors in GMEM: [b (retnet)], rq, rk."""
  return int(st.has_b) + 2 * int(st.has_scale)


def _vec_sources(st: _Static) -> tuple[int, ...]:
  """The GMEM vector behind each shared-memory vector: [b rows, b cols (retnet)], rq, rk."""
  return ((0,) if st.has_b else ()) + tuple(range(_n_vecs(st)))


def _fetch_vecs(vec_ref, doc_ref, vec_s, doc_s, vec_bar, doc_bar, bi, hi, rows, slot,
                st: _Static):
  """TMA of one chunk's per-token vectors and document ids (two copies: row/column view)."""
  for i, src in enumerate(_vec_sources(st)):
    plgpu.copy_gmem_to_smem(vec_ref.at[src, bi, hi, rows], vec_s.at[i, slot],
                            vec_bar.at[i * 2 + slot])
  if st.has_seg:
    for view in range(2):
      plgpu.copy_gmem_to_smem(doc_ref.at[bi, rows], doc_s.at[view, slot],
                              doc_bar.at[view * 2 + slot])


def _wait_vecs(vec_bar, doc_bar, slot, st: _Static):
  for i in range(len(_vec_sources(st))):
    plgpu.barrier_wait(vec_bar.at[i * 2 + slot])
  if st.has_seg:
    for view in range(2):
      plgpu.barrier_wait(doc_bar.at[view * 2 + slot])


def _vec_smem(st: _Static):
  """(vec_s ``[n, 2 slots, C]`` float32, doc_s ``[2 views, 2 slots, C]`` int32) or Nones."""
  n = len(_vec_sources(st))
  return (plgpu.SMEM((n, 2, CHUNK), jnp.float32) if n else None,
          plgpu.SMEM((2, 2, CHUNK), jnp.int32) if st.has_seg else None)


def _vec_barriers(st: _Static):
  n = len(_vec_sources(st))
  return (plgpu.Barrier(num_barriers=2 * n) if n else None,
          plgpu.Barrier(num_barriers=4) if st.has_seg else None)


def _chan_smem(st: _Static, nb: int):
  """GLA: the chunk decay ``e^{b_C}`` of the CTA's d_k rows, float32 ``[2 slots, nb, 64]``."""
  return plgpu.SMEM((2, nb, TILE), jnp.float32) if st.gla else None


def _fetch_chan(a_ref, ch_s, ch_bar, bi, hi, kt, n, slot, nb: int, st: _Static):
  if st.gla:
    plgpu.copy_gmem_to_smem(a_ref.at[bi, hi, n, pl.ds(kt * nb, nb)], ch_s.at[slot],
                            ch_bar.at[slot])


def _decayed(x, r: int, a_ref, ch_s, bi, hi, n, slot, st: _Static):
  """State block r (``[64, 64]`` float32) times its chunk decay: a scalar (retnet/segments),
  per-row (GLA's per-channel gates: ``diag(e^{b_C}) S``) or none."""
  if st.gla:
    return x * _row(plgpu.load(ch_s.at[slot, r], layout=plgpu.Layout.WGMMA.reduce(1)), x.shape)
  if st.has_scale:
    return x * a_ref[bi, hi, n]
  return x


def _blk(ref, r: int, nb: int, axis: int):
  """The r-th 64-wide block of a tiled shared-memory ref along ``axis`` (itself if nb == 1)."""
  if nb == 1:
    return ref
  idx = [slice(None), slice(None)]
  idx[axis] = pl.ds(r * TILE, TILE)
  return ref.at[tuple(idx)]


def _t(ref):
  return ref.transpose((1, 0))


def _zeros(shape):
  return plgpu.layout_cast(jnp.full(shape, 0.0, jnp.float32), plgpu.Layout.WGMMA)


def _load_state(src_ref, buf, bar, nb: int):
  """float32 ``[d_k, 64]`` GMEM tile -> nb register blocks ``[64, 64]`` (via one smem tile)."""
  blocks = []
  for r in range(nb):
    plgpu.copy_gmem_to_smem(src_ref.at[pl.ds(r * TILE, TILE)], buf, bar.at[0])
    plgpu.barrier_wait(bar.at[0])
    blocks.append(buf[...])
    plgpu.commit_smem()      # reads done before the next TMA overwrites buf
  return tuple(blocks)


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


def _fwd_call(q, k, v, vecs, doc, chunk_decay, s0, st: _Static, save_states: bool, interpret):
  """Kernel layout in, ``(y [B, T_p, H, d_v], S_final f32 [B, H, d_k, d_v], states | None)``.

  With n_k > 1 d_k tiles (``_k_tile``) every CTA computes the partial output of its d_k rows
  (``(Q_r K_rᵀ ⊙ D) V + rq ⊙ (Q_r S_r)``, float32) and XLA sums the n_k partials.

  q, k: ``[B, T_p, H, d_k]``; v: ``[B, T_p, H, d_v]`` (padded); vecs: float32
  ``[n_vec, B, H, T_p]`` or None; doc: int32 ``[B, T_p]`` or None; chunk_decay: float32
  ``[B, H, N]`` or None; s0: float32 ``[B, H, d_k, d_v]`` or None. states: the bf16/f16
  state before every chunk, ``[B, H, N, d_k, d_v]``.
  """
  bsz, tp, h, dk = q.shape
  dvp = v.shape[-1]
  kts = _k_tile(dk)
  nv, nk, nc, nb = dvp // TILE, dk // kts, st.num_chunks, kts // TILE
  dtype = q.dtype
  ydt = dtype if nk == 1 and not st.gla else jnp.float32
  nvec = _n_vecs(st)
  tiles = _bf16_tiles()

  def kernel(q_ref, k_ref, v_ref, vec_ref, doc_ref, a_ref, s0_ref, y_ref, sf_ref, states_ref,
             smem, bars):
    (q_s, k_s, v_s, vec_s, doc_s, ch_s, st_s, vs_s, y_s, p_s, f32_s) = smem
    (q_bar, k_bar, v_bar, vec_bar, doc_bar, ch_bar, s0_bar) = bars
    bi, hi = lax.axis_index("batch"), lax.axis_index("heads")
    vt, kt = _grid_ids(nk)
    cols, kcols = pl.ds(vt * TILE, TILE), pl.ds(kt * kts, kts)

    def fetch(n, slot):
      rows = pl.ds(n * CHUNK, CHUNK)
      plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hi, kcols], q_s.at[slot], q_bar.at[slot])
      plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, hi, kcols], k_s.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, hi, cols], v_s.at[slot], v_bar.at[slot])
      _fetch_vecs(vec_ref, doc_ref, vec_s, doc_s, vec_bar, doc_bar, bi, hi, rows, slot, st)
      _fetch_chan(a_ref, ch_s, ch_bar, bi, hi, kt, n, slot, nb, st)

    def wait(slot):
      for bar in (q_bar, k_bar, v_bar) + ((ch_bar,) if st.gla else ()):
        plgpu.barrier_wait(bar.at[slot])
      _wait_vecs(vec_bar, doc_bar, slot, st)

    fetch(0, 0)
    if st.has_s0:
      s_init = _load_state(s0_ref.at[bi, hi, kcols, cols], f32_s, s0_bar, nb)
    else:
      s_init = tuple(_zeros((TILE, TILE)) for _ in range(nb))
    for r in range(nb):
      _blk(st_s, r, nb, 0)[...] = s_init[r].astype(dtype)
    plgpu.commit_smem()

    def step(n, s):
      slot = lax.rem(n, 2)

      @pl.when(n + 1 < nc)
      def _prefetch():
        fetch(n + 1, 1 - slot)

      wait(slot)
      q_n, k_n, v_n = q_s.at[slot], k_s.at[slot], v_s.at[slot]
      if save_states:
        plgpu.copy_smem_to_gmem(st_s, states_ref.at[bi, hi, n, kcols, cols])
      y = None
      if not st.gla:
        qk = _mm(q_n, _t(k_n), (CHUNK, CHUNK), st)
        p = _apply_mask(qk, _decay_mask(vec_s, doc_s, slot, st)).astype(dtype)
        y = _mm(_lhs(p, p_s, st), v_n, (CHUNK, TILE), st)
      qs = None
      for r in range(nb):
        qs = _mm(_blk(q_n, r, nb, 1), _blk(st_s, r, nb, 0), (CHUNK, TILE), st, acc=qs)
      if st.has_scale:
        rq, rk = _scale_vecs(vec_s, slot, st)
        qs = qs * _row(rq, qs.shape)
        vv = plgpu.load(v_n, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
        vs_s[...] = (vv * _row(rk, vv.shape)).astype(dtype)
      y_s[...] = (qs if y is None else y + qs).astype(ydt)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(y_s, y_ref.at[kt, bi, pl.ds(n * CHUNK, CHUNK), hi, cols])
      new = []
      for r in range(nb):
        s_r = _decayed(s[r], r, a_ref, ch_s, bi, hi, n, slot, st)
        new.append(_mm(_t(_blk(k_n, r, nb, 1)), vs_s if st.has_scale else v_n, (TILE, TILE),
                       st, acc=s_r))
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # y_s and st_s are free again
      for r in range(nb):
        _blk(st_s, r, nb, 0)[...] = new[r].astype(dtype)
      plgpu.commit_smem()
      return tuple(new)

    s = lax.fori_loop(0, nc, step, s_init)
    for r in range(nb):
      f32_s[...] = s[r]
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(f32_s, sf_ref.at[bi, hi, pl.ds(kt * kts + r * TILE, TILE), cols])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    plgpu.wait_smem_to_gmem(0)

  def entry(*refs):
    it = iter(refs)
    q_ref, k_ref, v_ref = next(it), next(it), next(it)
    vec_ref = next(it) if nvec else None
    doc_ref = next(it) if st.has_seg else None
    a_ref = next(it) if st.has_scale or st.gla else None
    s0_ref = next(it) if st.has_s0 else None
    y_ref, sf_ref = next(it), next(it)
    states_ref = next(it) if save_states else None
    smem = (plgpu.SMEM((2, CHUNK, kts), dtype, transforms=tiles),
            plgpu.SMEM((2, CHUNK, kts), dtype, transforms=tiles),
            plgpu.SMEM((2, CHUNK, TILE), dtype, transforms=tiles),
            *_vec_smem(st),
            _chan_smem(st, nb),
            plgpu.SMEM((kts, TILE), dtype, transforms=tiles),
            plgpu.SMEM((CHUNK, TILE), dtype, transforms=tiles) if st.has_scale else None,
            plgpu.SMEM((CHUNK, TILE), ydt,
                       transforms=tiles if ydt == dtype else _f32_tiles()),
            (plgpu.SMEM((CHUNK, CHUNK), dtype, transforms=tiles)
             if st.interpreting and not st.gla else None),
            plgpu.SMEM((TILE, TILE), jnp.float32, transforms=_f32_tiles()))
    bars = (plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=2),
            *_vec_barriers(st),
            plgpu.Barrier(num_barriers=2) if st.gla else None,
            plgpu.Barrier(num_barriers=1) if st.has_s0 else None)
    pl.run_scoped(lambda sm, br: kernel(q_ref, k_ref, v_ref, vec_ref, doc_ref, a_ref, s0_ref,
                                        y_ref, sf_ref, states_ref, sm, br), smem, bars)

  args = [q, k, v]
  args += [vecs] if nvec else []
  args += [doc] if st.has_seg else []
  args += [chunk_decay] if st.has_scale or st.gla else []
  args += [s0] if st.has_s0 else []
  out_type = [jax.ShapeDtypeStruct((nk, bsz, tp, h, dvp), ydt),
              jax.ShapeDtypeStruct((bsz, h, dk, dvp), jnp.float32)]
  if save_states:
    out_type.append(jax.ShapeDtypeStruct((bsz, h, nc, dk, dvp), dtype))
  outs = plgpu.kernel(
      entry, out_type=tuple(out_type), grid=(nv * nk, h, bsz),
      grid_names=("vk", "heads", "batch"),
      compiler_params=plgpu.CompilerParams(approx_math=True), interpret=interpret)(*args)
  y = outs[0][0] if nk == 1 else jnp.sum(outs[0], 0)
  y = y if st.gla else y.astype(dtype)
  return y, outs[1], (outs[2] if save_states else None)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------


def _bwd_call(q, k, v, dy, vecs, doc, chunk_decay, states, dsf, st: _Static, interpret):
  """Reverse-chunk backward. Inputs as ``_fwd_call`` plus dy ``[B, T_p, H, d_v]``, the saved
  states and the final-state cotangent dsf (float32 ``[B, H, d_k, d_v]``).

  Returns float32 ``(dq, dk [B, T_p, H, d_k], dv [B, T_p, H, d_v], dS_0 [B, H, d_k, d_v])``.
  A CTA owns one (d_v tile, d_k tile): dq and dk are partial sums over the d_v tiles, dv over
  the d_k tiles (``Aᵀ`` too is split by d_k rows: ``A = Σ_r Q_r K_rᵀ ⊙ D``); XLA adds them.
  """
  bsz, tp, h, dk = q.shape
  dvp = v.shape[-1]
  kts = _k_tile(dk)
  nv, nk, nc, nb = dvp // TILE, dk // kts, st.num_chunks, kts // TILE
  dtype = q.dtype
  nvec = _n_vecs(st)
  tiles = _bf16_tiles()

  def kernel(q_ref, k_ref, v_ref, dy_ref, vec_ref, doc_ref, a_ref, sp_ref, dsf_ref,
             dq_ref, dk_ref, dv_ref, ds0_ref, smem, bars):
    (q_s, k_s, v_s, dy_s, sp_s, vec_s, doc_s, ch_s, ds_s, a_s, da_s, dys_s, out_s) = smem
    (q_bar, k_bar, v_bar, dy_bar, sp_bar, vec_bar, doc_bar, ch_bar, st_bar) = bars
    bi, hi = lax.axis_index("batch"), lax.axis_index("heads")
    vt, kt = _grid_ids(nk)
    cols, kcols = pl.ds(vt * TILE, TILE), pl.ds(kt * kts, kts)

    def fetch(n, slot):
      ci = nc - 1 - n
      rows = pl.ds(ci * CHUNK, CHUNK)
      plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hi, kcols], q_s.at[slot], q_bar.at[slot])
      plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, hi, kcols], k_s.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, hi, cols], v_s.at[slot], v_bar.at[slot])
      plgpu.copy_gmem_to_smem(dy_ref.at[bi, rows, hi, cols], dy_s.at[slot], dy_bar.at[slot])
      plgpu.copy_gmem_to_smem(sp_ref.at[bi, hi, ci, kcols, cols], sp_s.at[slot],
                              sp_bar.at[slot])
      _fetch_vecs(vec_ref, doc_ref, vec_s, doc_s, vec_bar, doc_bar, bi, hi, rows, slot, st)
      _fetch_chan(a_ref, ch_s, ch_bar, bi, hi, kt, ci, slot, nb, st)

    def wait(slot):
      for bar in (q_bar, k_bar, v_bar, dy_bar, sp_bar) + ((ch_bar,) if st.gla else ()):
        plgpu.barrier_wait(bar.at[slot])
      _wait_vecs(vec_bar, doc_bar, slot, st)

    def emitter():
      """Writes float32 [64, 64] output tiles through a 2-slot ring, in call order; the first
      write waits for every earlier copy, later ones for all but the latest (other slot)."""
      count = [0]

      def emit(value, dst):
        j = count[0]
        count[0] += 1
        buf = out_s.at[j % 2]
        plgpu.wait_smem_to_gmem(0 if j == 0 else 1, wait_read_only=True)
        buf[...] = value
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(buf, dst)

      return emit

    fetch(0, 0)
    ds_init = _load_state(dsf_ref.at[bi, hi, kcols, cols], out_s.at[0], st_bar, nb)
    for r in range(nb):
      _blk(ds_s, r, nb, 0)[...] = ds_init[r].astype(dtype)
    plgpu.commit_smem()

    def step(n, ds):
      slot = lax.rem(n, 2)
      ci = nc - 1 - n
      rows = pl.ds(ci * CHUNK, CHUNK)

      @pl.when(n + 1 < nc)
      def _prefetch():
        fetch(n + 1, 1 - slot)

      wait(slot)
      q_n, k_n, v_n, dy_n, sp_n = (x.at[slot] for x in (q_s, k_s, v_s, dy_s, sp_s))
      if not st.gla:
        mask = _decay_mask(vec_s, doc_s, slot, st)
        a_s[...] = _apply_mask(_mm(q_n, _t(k_n), (CHUNK, CHUNK), st), mask).astype(dtype)
        da = _apply_mask(_mm(dy_n, _t(v_n), (CHUNK, CHUNK), st), mask).astype(dtype)
        da_s[...] = da
        da_lhs = da_s if st.interpreting else da
      rq = rk = None
      if st.has_scale:
        rq, rk = _scale_vecs(vec_s, slot, st)
        dyv = plgpu.load(dy_n, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
        dys_s[...] = (dyv * _row(rq, dyv.shape)).astype(dtype)
      plgpu.commit_smem()

      def scaled(x, vec):
        return x if vec is None else x * _row(vec, x.shape)

      def plus_intra(x, intra):
        """x plus the intra-chunk term ``intra()`` (GLA: XLA adds that part)."""
        return x if st.gla else intra() + x

      shape = (CHUNK, TILE)
      emit = emitter()
      # dV = Aᵀ dY + rk ⊙ (K dS)
      kds = None
      for r in range(nb):
        kds = _mm(_blk(k_n, r, nb, 1), _blk(ds_s, r, nb, 0), shape, st, acc=kds)
      emit(plus_intra(scaled(kds, rk), lambda: _mm(_t(a_s), dy_n, shape, st)),
           dv_ref.at[kt, bi, rows, hi, cols])
      # dK = dAᵀ Q + rk ⊙ (V dSᵀ), dQ = dA K + rq ⊙ (dY S_prevᵀ), one 64-column block at a time
      for r in range(nb):
        dcols = pl.ds(kt * kts + r * TILE, TILE)
        vds = _mm(v_n, _t(_blk(ds_s, r, nb, 0)), shape, st)
        emit(plus_intra(scaled(vds, rk), lambda: _mm(_t(da_s), _blk(q_n, r, nb, 1), shape, st)),
             dk_ref.at[vt, bi, rows, hi, dcols])
        dys = _mm(dy_n, _t(_blk(sp_n, r, nb, 0)), shape, st)
        emit(plus_intra(scaled(dys, rq), lambda: _mm(da_lhs, _blk(k_n, r, nb, 1), shape, st)),
             dq_ref.at[vt, bi, rows, hi, dcols])
      # dS <- a·dS + Qᵀ (rq ⊙ dY)
      new = []
      for r in range(nb):
        ds_r = _decayed(ds[r], r, a_ref, ch_s, bi, hi, ci, slot, st)
        new.append(_mm(_t(_blk(q_n, r, nb, 1)), dys_s if st.has_scale else dy_n, (TILE, TILE),
                       st, acc=ds_r))
      for r in range(nb):
        _blk(ds_s, r, nb, 0)[...] = new[r].astype(dtype)
      plgpu.commit_smem()
      return tuple(new)

    ds = lax.fori_loop(0, nc, step, ds_init)
    emit = emitter()
    for r in range(nb):
      emit(ds[r], ds0_ref.at[bi, hi, pl.ds(kt * kts + r * TILE, TILE), cols])
    plgpu.wait_smem_to_gmem(0)

  def entry(*refs):
    it = iter(refs)
    q_ref, k_ref, v_ref, dy_ref = next(it), next(it), next(it), next(it)
    vec_ref = next(it) if nvec else None
    doc_ref = next(it) if st.has_seg else None
    a_ref = next(it) if st.has_scale or st.gla else None
    sp_ref, dsf_ref, dq_ref, dk_ref, dv_ref, ds0_ref = (next(it) for _ in range(6))
    smem = (plgpu.SMEM((2, CHUNK, kts), dtype, transforms=tiles),
            plgpu.SMEM((2, CHUNK, kts), dtype, transforms=tiles),
            plgpu.SMEM((2, CHUNK, TILE), dtype, transforms=tiles),
            plgpu.SMEM((2, CHUNK, TILE), dtype, transforms=tiles),
            plgpu.SMEM((2, kts, TILE), dtype, transforms=tiles),
            *_vec_smem(st),
            _chan_smem(st, nb),
            plgpu.SMEM((kts, TILE), dtype, transforms=tiles),
            None if st.gla else plgpu.SMEM((CHUNK, CHUNK), dtype, transforms=tiles),
            None if st.gla else plgpu.SMEM((CHUNK, CHUNK), dtype, transforms=tiles),
            plgpu.SMEM((CHUNK, TILE), dtype, transforms=tiles) if st.has_scale else None,
            plgpu.SMEM((2, TILE, TILE), jnp.float32, transforms=_f32_tiles()))
    bars = (tuple(plgpu.Barrier(num_barriers=2) for _ in range(5)) + _vec_barriers(st)
            + (plgpu.Barrier(num_barriers=2) if st.gla else None,
               plgpu.Barrier(num_barriers=1)))
    pl.run_scoped(lambda sm, br: kernel(q_ref, k_ref, v_ref, dy_ref, vec_ref, doc_ref, a_ref,
                                        sp_ref, dsf_ref, dq_ref, dk_ref, dv_ref, ds0_ref, sm,
                                        br), smem, bars)

  args = [q, k, v, dy]
  args += [vecs] if nvec else []
  args += [doc] if st.has_seg else []
  args += [chunk_decay] if st.has_scale or st.gla else []
  args += [states, dsf]
  out_type = (jax.ShapeDtypeStruct((nv, bsz, tp, h, dk), jnp.float32),
              jax.ShapeDtypeStruct((nv, bsz, tp, h, dk), jnp.float32),
              jax.ShapeDtypeStruct((nk, bsz, tp, h, dvp), jnp.float32),
              jax.ShapeDtypeStruct((bsz, h, dk, dvp), jnp.float32))
  dq, dk_, dv, ds0 = plgpu.kernel(
      entry, out_type=out_type, grid=(nv * nk, h, bsz), grid_names=("vk", "heads", "batch"),
      compiler_params=plgpu.CompilerParams(approx_math=True), interpret=interpret)(*args)
  return jnp.sum(dq, 0), jnp.sum(dk_, 0), jnp.sum(dv, 0), ds0


# ------------------------------------------------------------------------------------------------
# Entry
# ------------------------------------------------------------------------------------------------


def _pad(x, axis: int, size: int):
  extra = size - x.shape[axis]
  if not extra:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, extra)
  return jnp.pad(x, pads)


def _doc_masks(segment_ids, bsz: int, t: int, nc: int):
  """Document indices and the chunk-boundary masks of ``tpu.py``.

  Returns ``(doc int32 [B, T_p], m, l float32 [B, N, C], keep float32 [B, N])``: m = the token
  sees the carried state, l = the token reaches the chunk's end state, keep = the carried state
  survives the chunk. The padding continues the last document.
  """
  tp = nc * CHUNK
  doc = _pad(ref_lib.doc_ids(segment_ids, bsz, t), 1, tp)
  if tp > t:
    doc = doc.at[:, t:].set(doc[:, t - 1:t])
  dc = doc.reshape(bsz, nc, CHUNK)
  prev = jnp.concatenate([jnp.zeros((bsz, 1), jnp.int32), dc[:, :-1, -1]], axis=1)
  m = (dc == prev[..., None]).astype(jnp.float32)
  l = (dc == dc[..., -1:]).astype(jnp.float32)
  keep = (prev == dc[..., -1]).astype(jnp.float32)
  return doc, m, l, keep


def _prepare(g, segment_ids, bsz: int, t: int, h: int, st: _Static):
  """Per-token and per-chunk decay/segment inputs of the kernels (scalar decays).

  g: float32 ``[B, T, H]`` per-token log-decays or None. Returns ``(vecs [n_vec, B, H, T_p]
  float32 or None, doc int32 [B, T_p] or None, chunk_decay float32 [B, H, N] or None)``:
  vecs = [in-chunk cumulative log-decay in base 2 (retnet)], rq, rk (see module docstring).
  """
  nc = st.num_chunks
  tp = nc * CHUNK
  if not st.has_scale:
    return None, None, None
  doc, m, l, keep = _doc_masks(segment_ids, bsz, t, nc)
  m, l, keep = m[:, None], l[:, None], keep[:, None]
  if g is None:
    bc = jnp.zeros((bsz, 1, nc, CHUNK), jnp.float32)
  else:
    bc = jnp.cumsum(jnp.swapaxes(_pad(g, 1, tp), 1, 2).reshape(bsz, h, nc, CHUNK), axis=-1)
  rq = jnp.exp(bc) * m
  rk = jnp.exp(bc[..., -1:] - bc) * l
  a = jnp.exp(bc[..., -1]) * keep
  vecs = [rq, rk] if g is None else [bc * LOG2E, rq, rk]
  vecs = jnp.stack([jnp.broadcast_to(x, (bsz, h, nc, CHUNK)).reshape(bsz, h, tp)
                    for x in vecs])
  return vecs, (doc if st.has_seg else None), jnp.broadcast_to(a, (bsz, h, nc))


def _gla_scales(g, segment_ids, bsz: int, t: int, nc: int):
  """GLA's per-token per-channel factors (float32, exponents <= 0).

  g: float32 ``[B, T, H, d_k]``. Returns ``(rq, rk [B, T_p, H, d_k], a [B, H, N, d_k])``:
  ``rq = e^{b}·m``, ``rk = e^{b_C - b}·l``, ``a = e^{b_C}·keep`` with b the in-chunk cumulative
  log gates, so that ``q_in = q ⊙ rq`` and ``k_out = k ⊙ rk`` enter the state recurrence.
  """
  _, m, l, keep = _doc_masks(segment_ids, bsz, t, nc)
  tp = nc * CHUNK
  h, dk = g.shape[2:]
  bc = jnp.cumsum(_pad(g, 1, tp).reshape(bsz, nc, CHUNK, h, dk), axis=2)
  rq = jnp.exp(bc) * m[..., None, None]
  rk = jnp.exp(bc[:, :, -1:] - bc) * l[..., None, None]
  a = jnp.exp(bc[:, :, -1]) * keep[..., None, None]                     # [B, N, H, d_k]
  return (rq.reshape(bsz, tp, h, dk), rk.reshape(bsz, tp, h, dk),
          jnp.transpose(a, (0, 2, 1, 3)))


def _gla_intra(q, k, v, g, segment_ids, sub: int):
  """GLA's intra-chunk term ``Σ_{j <= i, same chunk and document} (Σ_d q_id k_jd e^{G_id -
  G_jd}) v_j`` in XLA (``reference.py``'s sub-chunk form, every exponent <= 0), float32
  ``[B, T, H, d_v]``; differentiable in q, k, v and g (plain autodiff)."""
  bsz, t = q.shape[:2]
  nc = -(-t // CHUNK)
  tp = nc * CHUNK
  doc = _doc_masks(segment_ids, bsz, t, nc)[0].reshape(bsz, nc, CHUNK)
  qc, kc, vc, gc = (ref_lib._to_chunks(_pad(x.astype(jnp.float32), 1, tp), CHUNK)
                    for x in (q, k, v, g))                              # [B, H, N, C, ·]
  scores = ref_lib._gla_intra_chunk(qc, kc, jnp.cumsum(gc, axis=-2), sub)
  causal = jnp.tril(jnp.ones((CHUNK, CHUNK), bool))
  allowed = (causal & (doc[..., :, None] == doc[..., None, :]))[:, None]
  y = jnp.einsum("bhncs,bhnse->bhnce", jnp.where(allowed, scores, 0.0), vc)
  return ref_lib._from_chunks(y)[:, :t]


def linear_attention_gpu(q, k, v, *, log_decay=None, segment_ids=None, initial_state=None,
                         block_sizes: BlockSizes | None = None, interpret=None):
  """Chunked causal linear attention with the Mosaic GPU kernels (semantics: ``reference.py``).

  Args:
    q, k: ``[batch, T, heads, d_k]`` features; v: ``[batch, T, heads, d_v]`` (bf16 or f16).
    log_decay: None ("none"), ``[heads]`` or ``[batch, T, heads]`` ("retnet"),
      ``[batch, T, heads, d_k]`` ("gla"); entries <= 0.
    segment_ids: int ``[batch, T]`` or None (the state resets where the id changes).
    initial_state: ``[batch, heads, d_k, d_v]`` or None (zeros).
    block_sizes: chunk_size must be 64 (default ``BlockSizes()``); sub_chunk: GLA's
      intra-chunk sub-chunks (XLA part).
    interpret: None on a GPU; ``plgpu.InterpretGPUParams(...)`` to run on CPU.

  Returns:
    ``(y [batch, T, heads, d_v] in v's dtype, final state [batch, heads, d_k, d_v] float32)``,
    differentiable in q, k, v, log_decay and initial_state. Raises ValueError where
    ``supported`` gives a reason.
  """
  kind = ref_lib.check_inputs(q, k, v, log_decay, segment_ids, initial_state)
  reason = supported(q, k, v, log_decay, block_sizes)
  if reason is not None:
    raise ValueError(f"Mosaic GPU linear attention does not support {reason}")
  bs = block_sizes or BlockSizes()
  bsz, t, h, dk = q.shape
  dv = v.shape[-1]
  nc = -(-t // CHUNK)
  tp = nc * CHUNK
  dkp, dvp = _pad64(dk), _pad64(dv)
  g = ref_lib.per_token_log_decay(log_decay, bsz, t)
  gla = kind == "gla"
  scalar = g is not None and not gla
  st = _Static(has_b=scalar, has_scale=not gla and (scalar or segment_ids is not None),
               gla=gla, has_seg=segment_ids is not None and not gla,
               has_s0=initial_state is not None, num_chunks=nc,
               interpreting=bool(interpret) or jax.default_backend() != "gpu")

  def pad_in(x, d):
    return _pad(_pad(x, 1, tp), 3, d)

  def inputs(q, k, g):
    """(q, k as the kernel reads them, vecs, doc, chunk decay, (rq, rk) of GLA or None)."""
    g32 = None if g is None else g.astype(jnp.float32)
    if not gla:
      vecs, doc, a = _prepare(g32, segment_ids, bsz, t, h, st)
      return pad_in(q, dkp), pad_in(k, dkp), vecs, doc, a, None
    rq, rk, a = _gla_scales(g32, segment_ids, bsz, t, nc)
    q_in = pad_in((_pad(q, 1, tp) * rq).astype(q.dtype), dkp)
    k_out = pad_in((_pad(k, 1, tp) * rk).astype(k.dtype), dkp)
    a = _pad(a, 3, dkp).reshape(bsz, h, nc, dkp // TILE, TILE)
    return q_in, k_out, None, None, a, (rq, rk)

  def fwd(q, k, v, g, s0, save_states):
    qk_in = inputs(q, k, g)
    s0p = None if s0 is None else _pad(_pad(s0.astype(jnp.float32), 2, dkp), 3, dvp)
    y, sf, states = _fwd_call(qk_in[0], qk_in[1], pad_in(v, dvp), *qk_in[2:5], s0p, st,
                              save_states, interpret)
    return y[:, :t, :, :dv], sf[:, :, :dk, :dv], (qk_in, states, sf)

  @jax.custom_vjp
  def core(q, k, v, g, s0):
    y, sf, _ = fwd(q, k, v, g, s0, False)
    return y, sf

  def core_fwd(q, k, v, g, s0):
    y, sf, res = fwd(q, k, v, g, s0, True)
    return (y, sf), (q, k, v, g, s0, res)

  def core_bwd(res, cts):
    q, k, v, g, s0, ((q_k, k_k, vecs, doc, a, scales), states, sf) = res
    dy, dsf = cts
    dq, dk_, dv_, ds0 = _bwd_call(
        q_k, k_k, pad_in(v, dvp), pad_in(dy.astype(v.dtype), dvp), vecs, doc, a, states,
        _pad(_pad(dsf.astype(jnp.float32), 2, dkp), 3, dvp), st, interpret)
    dq, dk_ = dq[:, :t, :, :dk], dk_[:, :t, :, :dk]
    if scales is not None:                 # GLA: through q_in = q ⊙ rq, k_out = k ⊙ rk
      dq, dk_ = dq * scales[0][:, :t], dk_ * scales[1][:, :t]
    dg = None
    if g is not None:
      # dL/dG per channel (summed over channels for scalar decays), then reverse cumsum
      dgc = q.astype(jnp.float32) * dq - k.astype(jnp.float32) * dk_        # [B, T, H, d_k]
      final = jnp.sum(sf[:, :, :dk, :dv] * dsf.astype(jnp.float32), axis=-1)   # [B, H, d_k]
      if not gla:
        dgc, final = jnp.sum(dgc, -1), jnp.sum(final, -1)
      dgc = dgc.at[:, -1].add(final)
      dg = jnp.flip(jnp.cumsum(jnp.flip(dgc, 1), axis=1), 1).astype(g.dtype)
    return (dq.astype(q.dtype), dk_.astype(k.dtype), dv_[:, :t, :, :dv].astype(v.dtype), dg,
            None if s0 is None else ds0[:, :, :dk, :dv].astype(s0.dtype))

  core.defvjp(core_fwd, core_bwd)
  y, sf = core(q, k, v, g, initial_state)
  if gla:
    y = y + _gla_intra(q, k, v, g, segment_ids, bs.sub_for(CHUNK))
  return y.astype(v.dtype), sf
