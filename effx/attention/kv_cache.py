"""The KV cache of softmax attention kinds: an explicit pytree with static shapes."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


def _write_rows(buffer: jax.Array, rows: jax.Array, start: jax.Array) -> jax.Array:
  """Writes rows [batch, T, ...] into buffer [batch, L, ...] at per-row offsets start [batch]."""
  def one(buf, new, s):
    return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), s, axis=0)
  return jax.vmap(one)(buffer, rows, start)


@flax.struct.dataclass
class KVCache:
  """Keys and values of every cached position, per row of the batch.

  Attributes:
    k: [batch, max_len, kv_heads, head_dim] keys (rotary already applied).
    v: [batch, max_len, kv_heads, head_dim] values.
    length: int32 [batch] number of valid leading slots per row. Slot j holds position j.
  """

  k: jax.Array
  v: jax.Array
  length: jax.Array

  @classmethod
  def create(cls, batch: int, max_len: int, kv_heads: int, head_dim: int,
             dtype: jnp.dtype = jnp.float32) -> "KVCache":
    """An empty cache (zeros, length 0)."""
    shape = (batch, max_len, kv_heads, head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               length=jnp.zeros((batch,), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.k.shape[1]

  def append(self, k_new: jax.Array, v_new: jax.Array) -> "KVCache":
    """Writes T new rows at slots `length .. length+T-1` of each row; length += T.

    Args:
      k_new, v_new: [batch, T, kv_heads, head_dim].
    """
    return KVCache(k=_write_rows(self.k, k_new, self.length),
                   v=_write_rows(self.v, v_new, self.length),
                   length=self.length + k_new.shape[1])

  def commit(self, start: jax.Array, accepted: jax.Array, num_accepted: jax.Array) -> "KVCache":
    """Keeps only the accepted new tokens, moved to contiguous slots after `start`.

    Called right after a verification call that appended T tokens at `start`.

    Args:
      start: int32 [batch] the length before the verification call.
      accepted: int32 [batch, A] indices (0..T-1) into the new tokens, root-to-leaf order;
        entries past `num_accepted` are ignored.
      num_accepted: int32 [batch] how many entries of `accepted` are real.

    Returns:
      The cache plain decoding would have built: slots start..start+num_accepted-1 hold the
      accepted tokens' keys and values, and `length = start + num_accepted`.
    """
    src = start[:, None] + jnp.maximum(accepted, 0)  # [batch, A]
    gather = jax.vmap(lambda buf, idx: jnp.take(buf, idx, axis=0))
    k = _write_rows(self.k, gather(self.k, src), start)
    v = _write_rows(self.v, gather(self.v, src), start)
    return KVCache(k=k, v=v, length=start + num_accepted)
