"""Feature maps φ for linear attention (pure functions + a small frozen config).

A feature map turns a query or key vector ``x: [..., d]`` into a feature vector
``φ(x): [..., d_φ]`` so that ``φ(q)ᵀφ(k)`` stands in for the softmax kernel ``exp(qᵀk/√d)``.

Kinds (``FEATURE_MAP_KINDS``):

- ``"identity"``: ``φ(x) = x`` (d_φ = d). Used by GLA / DeltaNet, where the module L2-normalises.
- ``"elu"``: ``φ(x) = elu(x) + 1`` (d_φ = d, strictly positive; Katharopoulos et al. 2020).
- ``"relu"``: ``φ(x) = relu(x)`` (d_φ = d, non-negative).
- ``"taylor"``: Based's 2nd-order Taylor expansion of ``exp(qᵀk/√d)``:
  ``φ(x) = [1, x/d^{1/4}, vec(x⊗x)/(√2·√d)]`` (d_φ = 1 + d + d²), so
  ``φ(q)ᵀφ(k) = 1 + qᵀk/√d + (qᵀk)²/(2d)`` (always > 0). Use it on a small projected dim (16).
- ``"performer"``: FAVOR+ positive random features (Choromanski et al. 2021) for
  ``exp(qᵀk/√d)``: with ``x' = x/d^{1/4}`` and a fixed random matrix ``W: [m, d]`` with orthogonal
  rows (``orthogonal_random_matrix``), ``φ(x) = exp(W x' - |x'|²/2)/√m`` (d_φ = m).
  There is no max-subtraction stabiliser (it would couple tokens and break the recurrent form);
  the exponent is bounded above by ``|w|²/2`` so it cannot overflow float32 for moderate d.
  The matrix is drawn once (at module init) and never redrawn.

All functions are traceable jnp and keep the input dtype.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

FEATURE_MAP_KINDS: tuple[str, ...] = ("identity", "elu", "relu", "taylor", "performer")
POSITIVE_FEATURE_MAPS: tuple[str, ...] = ("elu", "relu", "taylor", "performer")


def identity_features(x: jax.Array) -> jax.Array:
    """φ(x) = x. ``x: [..., d] -> [..., d]``, same dtype."""
    return x


def elu_features(x: jax.Array) -> jax.Array:
    """φ(x) = elu(x) + 1 (> 0). ``x: [..., d] -> [..., d]``, same dtype."""
    return jax.nn.elu(x) + 1.0


def relu_features(x: jax.Array) -> jax.Array:
    """φ(x) = max(x, 0). ``x: [..., d] -> [..., d]``, same dtype."""
    return jax.nn.relu(x)


def taylor_features(x: jax.Array) -> jax.Array:
    """Based 2nd-order Taylor features. ``x: [..., d] -> [..., 1 + d + d*d]``, same dtype.

    ``φ(x) = [1, x/d^{1/4}, vec(x⊗x)/(√2·√d)]`` so ``φ(q)·φ(k) = 1 + qᵀk/√d + (qᵀk)²/(2d)``.
    """
    d = x.shape[-1]
    ones = jnp.ones(x.shape[:-1] + (1,), x.dtype)
    first = x * (d ** -0.25)
    outer = (x[..., :, None] * x[..., None, :]).reshape(x.shape[:-1] + (d * d,))
    second = outer * (1.0 / (math.sqrt(2.0) * math.sqrt(d)))
    return jnp.concatenate([ones, first, second.astype(x.dtype)], axis=-1)


def orthogonal_random_matrix(key: jax.Array, num_features: int, dim: int) -> jax.Array:
    """Performer's orthogonal Gaussian projection. Returns float32 ``[num_features, dim]``.

    Rows come in blocks of ``dim`` mutually orthogonal directions (QR of a Gaussian matrix),
    each row rescaled to the norm of an independent Gaussian vector (chi-distributed), so every
    row is marginally ``N(0, I_dim)`` as the FAVOR+ estimator requires.
    """
    if num_features <= 0 or dim <= 0:
        raise ValueError(f"num_features={num_features}, dim={dim}: both must be > 0")
    num_blocks = -(-num_features // dim)
    qkey, nkey = jax.random.split(key)
    gauss = jax.random.normal(qkey, (num_blocks, dim, dim), jnp.float32)
    q, r = jnp.linalg.qr(gauss)  # [blocks, dim, dim], orthonormal columns
    # sign fix so that Q is Haar-distributed (plain Householder QR is not)
    q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    rows = jnp.swapaxes(q, -1, -2).reshape(num_blocks * dim, dim)[:num_features]
    norms = jnp.linalg.norm(jax.random.normal(nkey, (num_features, dim), jnp.float32), axis=-1)
    return rows * norms[:, None]


def performer_features(x: jax.Array, projection: jax.Array) -> jax.Array:
    """FAVOR+ positive random features. ``x: [..., d]``, ``projection: [m, d]`` -> ``[..., m]``.

    ``φ(x) = exp(W x' - |x'|²/2)/√m`` with ``x' = x/d^{1/4}``; computed in float32 and cast back
    to ``x.dtype``. ``E[φ(q)·φ(k)] = exp(qᵀk/√d)`` for Gaussian rows of ``W``.
    """
    d = x.shape[-1]
    m = projection.shape[0]
    xs = x.astype(jnp.float32) * (d ** -0.25)
    wx = jnp.einsum("...d,md->...m", xs, projection.astype(jnp.float32))
    sq = 0.5 * jnp.sum(xs * xs, axis=-1, keepdims=True)
    return (jnp.exp(wx - sq) * (m ** -0.5)).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class FeatureMap:
    """Config of a feature map: ``kind`` in ``FEATURE_MAP_KINDS``; ``num_random_features``
    (Performer's m, ``None`` = input dim) is ignored by the other kinds."""

    kind: str = "elu"
    num_random_features: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_MAP_KINDS:
            raise ValueError(f"feature_map={self.kind!r}: must be one of {FEATURE_MAP_KINDS}")
        if self.num_random_features is not None and self.num_random_features <= 0:
            raise ValueError(
                f"num_random_features={self.num_random_features}: must be > 0 or None")

    @property
    def is_positive(self) -> bool:
        """Whether φ(x) ≥ 0 elementwise (required by the φ(q)ᵀz denominator)."""
        return self.kind in POSITIVE_FEATURE_MAPS

    @property
    def needs_projection(self) -> bool:
        """Whether the map needs a random projection matrix (Performer)."""
        return self.kind == "performer"

    def random_features(self, input_dim: int) -> int:
        """Performer's m for an input dim (``num_random_features`` or ``input_dim``)."""
        return self.num_random_features or input_dim

    def output_dim(self, input_dim: int) -> int:
        """d_φ for an input dim d: d (identity/elu/relu), 1+d+d² (taylor), m (performer)."""
        if self.kind == "taylor":
            return 1 + input_dim + input_dim * input_dim
        if self.kind == "performer":
            return self.random_features(input_dim)
        return input_dim

    def __call__(self, x: jax.Array, projection: jax.Array | None = None) -> jax.Array:
        """Apply φ. ``x: [..., d] -> [..., d_φ]``; ``projection: [m, d]`` for Performer only."""
        if self.kind == "identity":
            return identity_features(x)
        if self.kind == "elu":
            return elu_features(x)
        if self.kind == "relu":
            return relu_features(x)
        if self.kind == "taylor":
            return taylor_features(x)
        if projection is None:
            raise ValueError("feature_map='performer': a projection matrix [m, d] is required")
        return performer_features(x, projection)
