"""Expert parallelism on an 8-device CPU mesh equals the single-device layer (subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType
    from effx.moe import MoEFeedForward

    assert len(jax.devices()) == 8
    x = jax.random.normal(jax.random.key(0), (4, 6, 16))
    CASES = [
        (dict(dispatch="dropless"), [((8,), ("expert",), AxisType.Explicit),
                                      ((2, 4), ("data", "expert"), AxisType.Auto)]),
        # capacity factor E / k: the per-device capacity is T/P, nothing can be dropped
        (dict(dispatch="capacity", eval_capacity_factor=4.0),
         [((8,), ("expert",), AxisType.Explicit)]),
        (dict(routing="expert_choice", causal=False), [((4,), ("expert",), AxisType.Auto)]),
    ]
    for kw, meshes in CASES:
      m = MoEFeedForward(num_experts=8, top_k=2, expert_dim=8, **kw)
      params = {"params": m.init(jax.random.key(1), x)["params"]}

      def loss(p, x):
        y, sown = m.apply(p, x, mutable=["aux_loss", "metrics"])
        aux = sum(jnp.sum(a) for a in jax.tree.leaves(sown["aux_loss"]))
        return jnp.sum(y * jnp.cos(y)) + aux, (y, sown["metrics"]["drop_rate"][0])

      step = jax.value_and_grad(loss, has_aux=True, argnums=(0, 1))
      (l0, (y0, _)), g0 = jax.jit(step)(params, x)
      for shape, names, axis_type in meshes:
        mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))
        with jax.set_mesh(mesh):
          compiled = jax.jit(step).lower(params, x).compile()
          assert "all-to-all" in compiled.as_text(), "expert parallel path not taken"
          (l1, (y1, drop)), g1 = compiled(params, x)
          y_dec = jax.jit(m.apply)(params, x[:1, :1])  # decoding: 1 token padded to P
        np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
        assert float(drop) == 0.0
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
          np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(y_dec), np.asarray(m.apply(params, x[:1, :1])),
                                   rtol=1e-5, atol=1e-6)
        print("ok", kw, shape)

    # Too few experts for the axis is a one-line error naming the field.
    m = MoEFeedForward(num_experts=4, top_k=2, expert_dim=8)
    params = {"params": m.init(jax.random.key(1), x)["params"]}
    with jax.set_mesh(jax.make_mesh((8,), ("expert",), axis_types=(AxisType.Auto,))):
      try:
        m.apply(params, x)
        raise AssertionError("no error")
      except ValueError as e:
        assert "num_experts" in str(e), e
    print("ALL OK")
""")


@pytest.mark.slow
def test_expert_parallel_equals_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0 and "ALL OK" in proc.stdout, proc.stdout + proc.stderr[-4000:]
