"""Plain autoregressive generation: prefill, then a jitted `lax.while_loop` over a KV cache."""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from effx.decoding.sampling import SamplingConfig, sample
from effx.model import DecoderLM, cache_length, set_cache_length


@flax.struct.dataclass
class GenerateOutput:
  """Generated continuations.

  Attributes:
    tokens: int32 [batch, max_new_tokens]; entries after a row's end are `pad_id`.
    lengths: int32 [batch] number of generated tokens per row (including the EOS token).
    steps: int32 scalar, model calls made after the prefill.
  """

  tokens: jax.Array
  lengths: jax.Array
  steps: jax.Array


def validate_prompts(prompts: np.ndarray, prompt_lengths: np.ndarray, max_new_tokens: int,
                     max_len: int, vocab_size: int) -> None:
  """Checks prompts on the host before any compute; one-line ValueErrors naming the problem.

  Args:
    prompts: int [batch, prompt_len] right-padded prompt tokens.
    prompt_lengths: int [batch] real lengths.
  """
  prompts, prompt_lengths = np.asarray(prompts), np.asarray(prompt_lengths)
  if prompts.ndim != 2:
    raise ValueError(f"prompts: must be [batch, prompt_len], got shape {prompts.shape}")
  if prompt_lengths.shape != prompts.shape[:1]:
    raise ValueError(f"prompt_lengths: must be [batch]={prompts.shape[:1]}, got "
                     f"{prompt_lengths.shape}")
  if not np.issubdtype(prompts.dtype, np.integer):
    raise ValueError(f"prompts: must be integer token ids, got dtype {prompts.dtype}")
  if (prompt_lengths < 1).any():
    raise ValueError(f"prompt_lengths: every prompt needs at least one token, got "
                     f"{prompt_lengths.tolist()}")
  if (prompt_lengths > prompts.shape[1]).any():
    raise ValueError(f"prompt_lengths: {prompt_lengths.tolist()} exceed the padded prompt "
                     f"width {prompts.shape[1]}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens: got {max_new_tokens}; must be >= 1")
  if prompts.shape[1] + max_new_tokens > max_len:
    raise ValueError(f"max_len: a prompt of {prompts.shape[1]} tokens plus {max_new_tokens} new "
                     f"tokens needs a cache of {prompts.shape[1] + max_new_tokens}, "
                     f"but max_len is {max_len}")
  valid = np.arange(prompts.shape[1])[None] < prompt_lengths[:, None]
  bad = (prompts < 0) | (prompts >= vocab_size)
  if (bad & valid).any():
    raise ValueError(f"prompts: token ids must be in [0, {vocab_size}), got "
                     f"{prompts[bad & valid][:5].tolist()}")


def prefill(model: DecoderLM, variables: Any, prompts: jax.Array, prompt_lengths: jax.Array,
            max_len: int) -> tuple[Any, jax.Array, jax.Array]:
  """Runs the prompts through the model into a fresh cache.

  Returns (cache with length = prompt_lengths, logits at each row's last prompt token
  [batch, vocab] f32, hidden states of every prompt position [batch, prompt_len, embed]).
  """
  batch = prompts.shape[0]
  cache = model.init_cache(batch, max_len)
  positions = jnp.broadcast_to(jnp.arange(prompts.shape[1], dtype=jnp.int32), prompts.shape)
  out = model.apply(variables, prompts, positions, prompt_segments(prompts, prompt_lengths),
                    cache=cache)
  last = prompt_lengths - 1
  rows = jnp.arange(batch)
  return set_cache_length(out.cache, prompt_lengths), out.logits[rows, last], out.hidden


def prompt_segments(prompts: jax.Array, prompt_lengths: jax.Array) -> jax.Array:
  """int32 [batch, prompt_len]: 1 on real prompt tokens, 0 on right padding.

  Recurrent kinds (linear attention) must not fold padding into their state; softmax kinds
  ignore it (their cache length is set to the real length afterwards).
  """
  return (jnp.arange(prompts.shape[1])[None] < prompt_lengths[:, None]).astype(jnp.int32)


def step_keys(key: jax.Array, step: jax.Array, batch: int) -> jax.Array:
  """One PRNG key per row for decoding step `step` (seeded runs repeat exactly)."""
  return jax.random.split(jax.random.fold_in(key, step), batch)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "max_len", "sampling",
                                             "eos_id", "pad_id"))
def _generate(model, variables, prompts, prompt_lengths, key, *, max_new_tokens, max_len,
              sampling, eos_id, pad_id):
  batch = prompts.shape[0]
  cache, logits, _ = prefill(model, variables, prompts, prompt_lengths, max_len)
  first = sample(step_keys(key, 0, batch), logits, sampling)
  tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)

  def cond(carry):
    i, _, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, cache, token, tokens, done = carry
    tokens = tokens.at[:, i].set(jnp.where(done, pad_id, token))
    done = done | (token == eos_id) | (i + 1 >= max_new_tokens)
    positions = cache_length(cache)[:, None]
    out = model.apply(variables, token[:, None], positions, cache=cache)
    nxt = sample(step_keys(key, i + 1, batch), out.logits[:, 0], sampling)
    return i + 1, out.cache, nxt, tokens, done

  init = (jnp.zeros((), jnp.int32), cache, first, tokens, jnp.zeros((batch,), bool))
  steps, _, _, tokens, _ = jax.lax.while_loop(cond, body, init)
  is_end = tokens == eos_id
  ends = jnp.where(is_end.any(axis=1), jnp.argmax(is_end, axis=1) + 1, max_new_tokens)
  lengths = jnp.minimum(ends, steps)
  return GenerateOutput(tokens=tokens, lengths=lengths.astype(jnp.int32), steps=steps)


def generate(model: DecoderLM, variables: Any, prompts: np.ndarray, prompt_lengths: np.ndarray,
             *, max_new_tokens: int, max_len: int, sampling: SamplingConfig = SamplingConfig(),
             key: jax.Array | None = None, eos_id: int = -1, pad_id: int = 0
             ) -> GenerateOutput:
  """Generates up to `max_new_tokens` tokens after each prompt.

  Args:
    model: the `DecoderLM`.
    variables: its variables ({"params": ..., plus any state collections}).
    prompts: int32 [batch, prompt_len] right-padded prompts; prompt_lengths: int32 [batch].
    max_new_tokens: generation budget per row.
    max_len: KV-cache length (>= prompt_len + max_new_tokens).
    sampling: greedy, temperature, top-k, top-p.
    key: PRNG key (needed unless greedy); each row and step gets its own key.
    eos_id: a row stops after emitting this token (-1: never).
    pad_id: filler after a row's end.

  Returns:
    `GenerateOutput`. Raises ValueError for bad prompts or a too-short cache, before compute.
  """
  validate_prompts(prompts, prompt_lengths, max_new_tokens, max_len, model.vocab_size)
  key = jax.random.key(0) if key is None else key
  return _generate(model, variables, jnp.asarray(prompts, jnp.int32),
                   jnp.asarray(prompt_lengths, jnp.int32), key, max_new_tokens=max_new_tokens,
                   max_len=max_len, sampling=sampling, eos_id=eos_id, pad_id=pad_id)


def pad_prompts(prompts: list[np.ndarray], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads a list of 1-D token arrays: (int32 [batch, max_len], lengths int32 [batch])."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  out = np.full((len(prompts), max(int(lengths.max(initial=1)), 1)), pad_id, np.int32)
  for i, p in enumerate(prompts):
    out[i, :len(p)] = p
  return out, lengths


__all__ = ["GenerateOutput", "generate", "prefill", "pad_prompts", "validate_prompts",
           "step_keys"]
