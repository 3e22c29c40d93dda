"""Hugging Face checkpoints <-> effx: Llama / Mistral / Qwen2 decoders and Medusa heads.

    from effx import hf_import
    model, params = hf_import.load_hf("path/to/Llama-3.2-1B")     # config.json + safetensors
    out = model.apply({"params": params}, tokens)                 # LMOutput(logits, hidden)
    hf_import.export_hf(model, params, "out_dir")                 # back to the HF layout

What is read: `config.json` and `model.safetensors` or a sharded checkpoint
(`model.safetensors.index.json` + the shards it names). Supported `architectures`:
LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (ValueError naming `architectures`
otherwise). The model is a `DecoderLM` of pre-norm blocks (RMSNorm, `MultiHeadAttention`, SwiGLU
`GatedMLP`) built from the config: vocab_size, hidden_size, num_hidden_layers,
num_attention_heads, num_key_value_heads, head_dim, intermediate_size, hidden_act,
rms_norm_eps, rope theta and scaling (none / "linear" / "llama3"; both the transformers 4
`rope_theta` + `rope_scaling` keys and the transformers 5 `rope_parameters` dict are read),
tie_word_embeddings, Qwen2's q/k/v biases (`use_qkv_bias=True`) and sliding windows (Mistral's
`sliding_window`, Qwen2's `use_sliding_window` + `max_window_layers` / `layer_types`) as
`CausalMask() & SlidingWindowMask(w)` (a key is visible iff 0 <= q - k < w, as in transformers'
masking_utils). Layers with different windows become a layer pattern of one block per layer.

Why no q/k permutation: transformers applies rotary embeddings in the "rotate_half" layout
(channel i pairs with channel i + head_dim/2) and so does `effx.layers.rotary.apply_rotary`
(half-split layout), so the projection weights are copied as they are (checked numerically
against transformers in tests/test_hf_import.py). RMSNorm: both compute the statistics in
float32 and multiply by the weight afterwards.

Parameter mapping (HF `[out, in]` Linear weights; effx names from effx.model / effx.attention):

    model.embed_tokens.weight [V, E]              -> embed/embedding [V, E]
    layers.i.input_layernorm.weight [E]           -> <layer i>/attention_norm/scale
    layers.i.self_attn.q_proj.weight [H*D, E]     -> <layer i>/attention/query_kernel [E, H, D]
    layers.i.self_attn.{k,v}_proj.weight [K*D, E] -> <layer i>/attention/{key,value}_kernel [E, K, D]
    layers.i.self_attn.{q,k,v}_proj.bias          -> <layer i>/attention/{query,key,value}_bias [., D]
    layers.i.self_attn.o_proj.weight [E, H*D]     -> <layer i>/attention/out_kernel [H, D, E]
    layers.i.post_attention_layernorm.weight [E]  -> <layer i>/ffn_norm/scale
    layers.i.mlp.{gate,up}_proj.weight [F, E]     -> <layer i>/ffn/wi [E, 2, F] (0 = gate, 1 = up)
    layers.i.mlp.down_proj.weight [E, F]          -> <layer i>/ffn/wo [F, E]
    model.norm.weight [E]                         -> final_norm/scale
    lm_head.weight [V, E]                         -> lm_head/kernel [E, V] (absent when tied)

Layer layout: by default (`scan_layers=False`) layer i is `repeat_{i // P}/block_{i % P}` (P =
the layer pattern's length: 1 for uniform models), one parameter subtree per HF layer, which
keeps a 1:1 map to the HF names and is what decoding wants. With `scan_layers=True` the same
weights are stacked on a leading "layers" axis under `layers/block_{j}` (faster compiles for
training/fine-tuning). `export_hf` reads either layout from `model.scan_layers`.

Medusa: `load_medusa_heads` reads a published `medusa_lm_head.safetensors` into `MedusaHeads`
(see its docstring for the block mapping).

Errors: a missing tensor, an unexpected one, or a tensor whose shape disagrees with the config
raises ValueError naming the tensor with the expected and found shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from effx.attention import masks as masks_lib
from effx.attention.mha import MultiHeadAttention
from effx.layers.mlp import GatedMLP
from effx.layers.rotary import RotaryConfig
from effx.model import DecoderBlock, DecoderLM

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                "Qwen2ForCausalLM": "qwen2"}
# transformers hidden_act -> effx.layers.mlp.ACTIVATIONS
_HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu_exact",
                   "gelu_pytorch_tanh": "gelu", "gelu_new": "gelu"}
_EFFX_ACTIVATIONS = {"silu": "silu", "gelu_exact": "gelu", "gelu": "gelu_pytorch_tanh"}
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # buffers some old checkpoints saved
_DTYPE_NAMES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class HFSpec:
  """The architecture of a supported HF checkpoint, in effx terms.

  Attributes:
    architecture: one of ARCHITECTURES.
    vocab_size / embed_dim / num_layers / num_heads / num_kv_heads / head_dim / mlp_dim: sizes.
    activation: the gate activation (effx name).
    norm_epsilon: RMSNorm epsilon.
    tie_embeddings: the LM head is the embedding table.
    use_qkv_bias: q/k/v projections have biases (Qwen2).
    rotary: RoPE settings.
    sliding_windows: per layer, the window (None = full causal attention).
    max_position_embeddings: recorded for export only (effx does not limit positions; not
      compared by ==).
  """

  architecture: str
  vocab_size: int
  embed_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  activation: str = "silu"
  norm_epsilon: float = 1e-6
  tie_embeddings: bool = False
  use_qkv_bias: bool = False
  rotary: RotaryConfig = RotaryConfig()
  sliding_windows: tuple[int | None, ...] = ()
  max_position_embeddings: int = dataclasses.field(default=4096, compare=False)

  def __post_init__(self):
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f"architectures: got {self.architecture!r}; supported: "
                       f"{list(ARCHITECTURES)}")
    windows = tuple(self.sliding_windows) or (None,) * self.num_layers
    if len(windows) != self.num_layers:
      raise ValueError(f"sliding_windows: {len(windows)} entries for {self.num_layers} layers")
    object.__setattr__(self, "sliding_windows", windows)


# --------------------------------------------------------------------------- config.json


def _rope_from_config(config: Mapping[str, Any]) -> RotaryConfig:
  """RotaryConfig from transformers 4 (rope_theta, rope_scaling) or 5 (rope_parameters) keys."""
  params = dict(config.get("rope_parameters") or {})
  if any(isinstance(v, dict) for v in params.values()):
    raise ValueError(f"rope_parameters: per-layer-type rope parameters are not supported, got "
                     f"{params}")
  field = "rope_parameters" if params else "rope_scaling"
  params = {**(config.get("rope_scaling") or {}), **params}
  theta = float(params.get("rope_theta", config.get("rope_theta", 10_000.0)))
  partial = float(params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
  if partial != 1.0:
    raise ValueError(f"partial_rotary_factor: got {partial}; only 1.0 is supported")
  kind = params.get("rope_type", params.get("type", "default")) or "default"
  if kind == "default":
    return RotaryConfig(base=theta)
  if kind == "linear":
    return RotaryConfig(base=theta, scaling="linear", factor=float(params["factor"]))
  if kind == "llama3":
    original = params.get("original_max_position_embeddings",
                          config.get("max_position_embeddings", 8192))
    return RotaryConfig(base=theta, scaling="llama3", factor=float(params["factor"]),
                        low_freq_factor=float(params["low_freq_factor"]),
                        high_freq_factor=float(params["high_freq_factor"]),
                        original_max_position=int(original))
  raise ValueError(f"{field}: rope type {kind!r} is not supported; supported: default, linear, "
                   f"llama3")


def _windows_from_config(arch: str, config: Mapping[str, Any], num_layers: int
                         ) -> tuple[int | None, ...]:
  window = config.get("sliding_window")
  if arch == "LlamaForCausalLM" or window is None:
    return (None,) * num_layers
  if arch == "MistralForCausalLM":
    return (int(window),) * num_layers
  # Qwen2: only when use_sliding_window, from layer max_window_layers on (or layer_types)
  if not config.get("use_sliding_window", False):
    return (None,) * num_layers
  types = config.get("layer_types")
  if types is None:
    start = int(config.get("max_window_layers", num_layers))
    types = ["sliding_attention" if i >= start else "full_attention" for i in range(num_layers)]
  if len(types) != num_layers:
    raise ValueError(f"layer_types: {len(types)} entries for num_hidden_layers={num_layers}")
  return tuple(int(window) if t == "sliding_attention" else None for t in types)


def spec_from_config(config: Mapping[str, Any]) -> HFSpec:
  """The `HFSpec` of a parsed HF `config.json` (ValueError for unsupported settings)."""
  archs = config.get("architectures") or []
  if len(archs) != 1 or archs[0] not in ARCHITECTURES:
    raise ValueError(f"architectures: got {archs}; supported: {list(ARCHITECTURES)}")
  arch = archs[0]
  act = config.get("hidden_act", "silu")
  if act not in _HF_ACTIVATIONS:
    raise ValueError(f"hidden_act: got {act!r}; supported: {sorted(_HF_ACTIVATIONS)}")
  if arch == "LlamaForCausalLM" and config.get("attention_bias", False):
    raise ValueError("attention_bias: True is not supported (effx has no o_proj bias)")
  if config.get("mlp_bias", False):
    raise ValueError("mlp_bias: True is not supported")
  try:
    embed, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    num_layers = int(config["num_hidden_layers"])
    spec = HFSpec(
        architecture=arch, vocab_size=int(config["vocab_size"]), embed_dim=embed,
        num_layers=num_layers, num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or embed // heads),
        mlp_dim=int(config["intermediate_size"]), activation=_HF_ACTIVATIONS[act],
        norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        use_qkv_bias=arch == "Qwen2ForCausalLM", rotary=_rope_from_config(config),
        sliding_windows=_windows_from_config(arch, config, num_layers),
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)))
  except KeyError as err:
    raise ValueError(f"config.json: missing key {err.args[0]!r} for {arch}") from None
  return spec


def read_spec(directory: str) -> HFSpec:
  """The `HFSpec` of the checkpoint directory's config.json."""
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"hf_import: no config.json in {directory!r}")
  with open(path) as f:
    return spec_from_config(json.load(f))


def _rope_to_config(rotary: RotaryConfig) -> dict:
  if rotary.scaling is None:
    return {"rope_type": "default"}
  if rotary.scaling == "linear":
    return {"rope_type": "linear", "factor": rotary.factor}
  return {"rope_type": "llama3", "factor": rotary.factor,
          "low_freq_factor": rotary.low_freq_factor, "high_freq_factor": rotary.high_freq_factor,
          "original_max_position_embeddings": rotary.original_max_position}


def config_from_spec(spec: HFSpec, param_dtype: Any = jnp.float32) -> dict:
  """A transformers `config.json` dict for `spec` (readable by transformers 4 and 5).

  Rope settings are written both as transformers 4 keys (`rope_theta`, `rope_scaling`) and as
  transformers 5's `rope_parameters`.
  """
  rope = _rope_to_config(spec.rotary)
  config = {
      "architectures": [spec.architecture], "model_type": _MODEL_TYPES[spec.architecture],
      "vocab_size": spec.vocab_size, "hidden_size": spec.embed_dim,
      "intermediate_size": spec.mlp_dim, "num_hidden_layers": spec.num_layers,
      "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
      "head_dim": spec.head_dim, "hidden_act": _EFFX_ACTIVATIONS[spec.activation],
      "rms_norm_eps": spec.norm_epsilon, "tie_word_embeddings": spec.tie_embeddings,
      "max_position_embeddings": spec.max_position_embeddings,
      "rope_theta": spec.rotary.base,
      "rope_scaling": None if spec.rotary.scaling is None else rope,
      "rope_parameters": {**rope, "rope_theta": spec.rotary.base},
      "torch_dtype": jnp.dtype(param_dtype).name, "dtype": jnp.dtype(param_dtype).name,
  }
  windows = spec.sliding_windows
  used = sorted({w for w in windows if w is not None})
  if len(used) > 1:
    raise ValueError(f"sliding_windows: HF configs hold one window size, got {used}")
  if spec.architecture == "LlamaForCausalLM":
    if used:
      raise ValueError("sliding_windows: LlamaForCausalLM has no sliding window; export as "
                       "MistralForCausalLM or Qwen2ForCausalLM")
    config.update(attention_bias=False, mlp_bias=False)
  elif spec.architecture == "MistralForCausalLM":
    if used and any(w is None for w in windows):
      raise ValueError("sliding_windows: Mistral windows every layer; got a mix with full "
                       "attention layers (export as Qwen2ForCausalLM)")
    config["sliding_window"] = used[0] if used else None
  else:
    types = ["full_attention" if w is None else "sliding_attention" for w in windows]
    config.update(use_sliding_window=bool(used), sliding_window=used[0] if used else None,
                  layer_types=types,
                  max_window_layers=types.index("sliding_attention") if used else spec.num_layers)
    if used and "full_attention" in types[types.index("sliding_attention"):]:
      raise ValueError("sliding_windows: Qwen2 windows the layers from max_window_layers on; "
                       f"got the pattern {types}")
  return config


# --------------------------------------------------------------------------- model


def _call(cls, **kwargs):
  return cls(**kwargs)


def describe_model(spec: HFSpec, *, partial: Callable = functools.partial,
                   make: Callable = _call, scan_layers: bool = False, impl: str = "xla",
                   dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                   remat_policy: str = "none") -> Any:
  """The `DecoderLM` for `spec`, built with `make(cls, **kw)` and `partial(cls, **kw)`.

  With the defaults it returns the module itself (see `build_model`); with `fdl.Config` /
  `fdl.Partial` it returns a fiddle config of the same model (experiments/configs/hf.py).
  Layers sharing one window form a one-block layer pattern; otherwise one block per layer.
  """
  def mask(window):
    if window is None:
      return None
    return make(masks_lib.AndMask, left=make(masks_lib.CausalMask),
                right=make(masks_lib.SlidingWindowMask, window=window))

  r = spec.rotary
  rotary = make(RotaryConfig, base=r.base, scaling=r.scaling, factor=r.factor,
                low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor,
                original_max_position=r.original_max_position)

  def block(window):
    attention = dict(num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
                     head_dim=spec.head_dim, rotary=rotary, impl=impl,
                     use_qkv_bias=spec.use_qkv_bias)
    if window is not None:
      attention["mask"] = mask(window)
    return partial(DecoderBlock, attention=partial(MultiHeadAttention, **attention),
                   ffn=partial(GatedMLP, hidden_dim=spec.mlp_dim, activation=spec.activation),
                   norm="rmsnorm", norm_epsilon=spec.norm_epsilon)

  windows = spec.sliding_windows
  uniform = len(set(windows)) == 1
  pattern = [block(windows[0])] if uniform else [block(w) for w in windows]
  return make(DecoderLM, vocab_size=spec.vocab_size, embed_dim=spec.embed_dim,
              num_layers=spec.num_layers, layer_pattern=pattern,
              tie_embeddings=spec.tie_embeddings, final_norm="rmsnorm",
              norm_epsilon=spec.norm_epsilon, scan_layers=scan_layers,
              remat_policy=remat_policy, dtype=dtype, param_dtype=param_dtype)


def build_model(spec: HFSpec, **kwargs) -> DecoderLM:
  """The `DecoderLM` of `spec`; kwargs: scan_layers, impl, dtype, param_dtype, remat_policy."""
  return describe_model(spec, **kwargs)


def spec_from_model(model: DecoderLM, architecture: str | None = None) -> HFSpec:
  """The `HFSpec` of an effx model, checking it is expressible in the HF layout.

  `architecture` defaults to Qwen2ForCausalLM with q/k/v biases, MistralForCausalLM with a
  sliding window, LlamaForCausalLM otherwise.
  """
  if model.final_norm != "rmsnorm":
    raise ValueError(f"model.final_norm: got {model.final_norm!r}; HF export needs 'rmsnorm'")
  layers = []
  for factory in model.layer_pattern:
    blk = factory(parent=None)
    attn = blk.make_attention(parent=None)
    ffn = blk.ffn(parent=None)
    if type(attn) is not MultiHeadAttention:
      raise ValueError(f"attention: HF export supports MultiHeadAttention, got "
                       f"{type(attn).__name__}")
    if type(ffn) is not GatedMLP or ffn.activation not in _EFFX_ACTIVATIONS:
      raise ValueError(f"ffn: HF export supports GatedMLP with activation in "
                       f"{sorted(_EFFX_ACTIVATIONS)}, got {type(ffn).__name__}")
    if blk.norm != "rmsnorm" or blk.norm_epsilon != model.norm_epsilon:
      raise ValueError(f"norm: HF export needs rmsnorm with one epsilon, got {blk.norm!r} "
                       f"eps {blk.norm_epsilon} (model {model.norm_epsilon})")
    if attn.logit_soft_cap is not None or attn.rotary.kind != "rope" or attn.rotary.fraction != 1:
      raise ValueError("attention: HF export needs full rope and no logit_soft_cap")
    layers.append((attn, ffn, _window_of(attn.mask)))
  attn0, ffn0, _ = layers[0]
  for attn, ffn, _ in layers[1:]:
    same = (attn.num_heads, attn.kv_heads, attn.head_dim, attn.rotary, attn.use_qkv_bias,
            ffn.hidden_dim, ffn.activation) == (attn0.num_heads, attn0.kv_heads, attn0.head_dim,
                                                attn0.rotary, attn0.use_qkv_bias,
                                                ffn0.hidden_dim, ffn0.activation)
    if not same:
      raise ValueError("layer_pattern: HF export needs every layer to have the same sizes")
  windows = tuple(layers[i % len(layers)][2] for i in range(model.num_layers))
  if architecture is None:
    architecture = ("Qwen2ForCausalLM" if attn0.use_qkv_bias else
                    "MistralForCausalLM" if any(w is not None for w in windows) else
                    "LlamaForCausalLM")
  if attn0.use_qkv_bias != (architecture == "Qwen2ForCausalLM"):
    raise ValueError(f"architecture: {architecture} has use_qkv_bias="
                     f"{architecture == 'Qwen2ForCausalLM'}, the model {attn0.use_qkv_bias}")
  return HFSpec(architecture=architecture, vocab_size=model.vocab_size,
                embed_dim=model.embed_dim, num_layers=model.num_layers,
                num_heads=attn0.num_heads, num_kv_heads=attn0.kv_heads,
                head_dim=attn0.resolved_head_dim(model.embed_dim), mlp_dim=ffn0.hidden_dim,
                activation=ffn0.activation, norm_epsilon=model.norm_epsilon,
                tie_embeddings=model.tie_embeddings, use_qkv_bias=attn0.use_qkv_bias,
                rotary=attn0.rotary, sliding_windows=windows)


def _window_of(mask: masks_lib.Mask) -> int | None:
  """None for CausalMask(), w for CausalMask() & SlidingWindowMask(w); ValueError otherwise."""
  parts, stack = [], [mask]
  while stack:
    m = stack.pop()
    if isinstance(m, masks_lib.AndMask):
      stack += [m.left, m.right]
    else:
      parts.append(m)
  windows = [p.window for p in parts if isinstance(p, masks_lib.SlidingWindowMask)]
  others = [p for p in parts if not isinstance(p, (masks_lib.SlidingWindowMask,
                                                   masks_lib.CausalMask))]
  if others or len(windows) > 1 or (not windows and not parts):
    raise ValueError(f"attention.mask: HF export supports causal or causal & sliding window, "
                     f"got {mask}")
  return windows[0] if windows else None


# --------------------------------------------------------------------------- tensors


class SafetensorsCheckpoint:
  """Lazy access to the tensors of `model.safetensors` or a sharded checkpoint directory."""

  def __init__(self, directory: str):
    from safetensors import safe_open
    self._open = safe_open
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      self.files = {name: os.path.join(directory, file) for name, file in weight_map.items()}
    elif os.path.isfile(single):
      with safe_open(single, framework="numpy") as f:
        self.files = {name: single for name in f.keys()}
    else:
      raise FileNotFoundError(f"hf_import: no model.safetensors or model.safetensors.index.json "
                              f"in {directory!r}")

  def names(self) -> list[str]:
    return sorted(self.files)

  def shape(self, name: str) -> tuple[int, ...]:
    with self._open(self.files[name], framework="numpy") as f:
      return tuple(f.get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    with self._open(self.files[name], framework="numpy") as f:
      return f.get_tensor(name)


def _layer_path(model: DecoderLM, i: int) -> tuple[tuple[str, ...], int | None]:
  """(path of layer i's block subtree, index on the stacked axis or None when unscanned)."""
  p = len(model.layer_pattern)
  if model.scan_layers:
    return ("layers", f"block_{i % p}"), i // p
  return (f"repeat_{i // p}", f"block_{i % p}"), None


# kind: how an effx leaf of shape s corresponds to the HF tensor
#   "copy": same; "T": transposed 2-D; "proj": [E,H,D] <- [H*D,E]; "bias": [H,D] <- [H*D];
#   "out": [H,D,E] <- [E,H*D]; "gate"/"up": wi[:, 0 / 1, :] of [E,2,F] <- [F,E].
def _entries(spec: HFSpec) -> list[tuple[str, tuple[str, ...], str, int | None]]:
  """(hf name, effx path, kind, layer or None) for every tensor of `spec`."""
  out = [("model.embed_tokens.weight", ("embed", "embedding"), "copy", None),
         ("model.norm.weight", ("final_norm", "scale"), "copy", None)]
  if not spec.tie_embeddings:
    out.append(("lm_head.weight", ("lm_head", "kernel"), "T", None))
  for i in range(spec.num_layers):
    p = f"model.layers.{i}."
    out += [(p + "input_layernorm.weight", ("attention_norm", "scale"), "copy", i),
            (p + "post_attention_layernorm.weight", ("ffn_norm", "scale"), "copy", i),
            (p + "self_attn.o_proj.weight", ("attention", "out_kernel"), "out", i),
            (p + "mlp.gate_proj.weight", ("ffn", "wi"), "gate", i),
            (p + "mlp.up_proj.weight", ("ffn", "wi"), "up", i),
            (p + "mlp.down_proj.weight", ("ffn", "wo"), "T", i)]
    for hf, effx in (("q", "query"), ("k", "key"), ("v", "value")):
      out.append((p + f"self_attn.{hf}_proj.weight", ("attention", f"{effx}_kernel"), "proj", i))
      if spec.use_qkv_bias:
        out.append((p + f"self_attn.{hf}_proj.bias", ("attention", f"{effx}_bias"), "bias", i))
  return out


def _hf_shape(kind: str, s: tuple[int, ...]) -> tuple[int, ...]:
  """The HF tensor shape that maps onto an effx leaf of shape `s` (per layer)."""
  if kind == "T":
    return s[::-1]
  if kind == "proj":
    return (int(np.prod(s[1:])), s[0])
  if kind == "bias":
    return (int(np.prod(s)),)
  if kind == "out":
    return (s[-1], int(np.prod(s[:-1])))
  if kind in ("gate", "up"):
    return (s[-1], s[0])
  return s


def _to_effx(kind: str, a: np.ndarray, s: tuple[int, ...]) -> np.ndarray:
  if kind == "T":
    return a.T
  if kind == "proj":
    return a.T.reshape(s)
  if kind in ("bias", "copy"):
    return a.reshape(s)
  if kind == "out":
    return a.T.reshape(s)
  return a.T  # gate / up: [F, E] -> [E, F], placed into wi[:, g, :] by the caller


def _to_hf(kind: str, a: np.ndarray) -> np.ndarray:
  if kind == "T":
    return a.T
  if kind == "proj":
    return a.reshape(a.shape[0], -1).T
  if kind == "bias":
    return a.reshape(-1)
  if kind == "out":
    return a.reshape(-1, a.shape[-1]).T
  if kind in ("gate", "up"):
    return a[:, 0 if kind == "gate" else 1, :].T
  return a


def _abstract_params(model: DecoderLM) -> dict:
  """Flat {path: ShapeDtypeStruct} of the model's (unboxed) parameters."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), tokens))["params"])
  return traverse_util.flatten_dict(shapes)


def convert_params(checkpoint: SafetensorsCheckpoint | Mapping[str, np.ndarray],
                   model: DecoderLM, spec: HFSpec | None = None) -> dict:
  """HF tensors -> the (unboxed) `params` of `model`, cast to `model.param_dtype`.

  `checkpoint` is a `SafetensorsCheckpoint` or a {name: array} mapping. Raises ValueError
  naming the tensor for a missing / unexpected tensor or a shape mismatch.
  """
  if isinstance(checkpoint, Mapping):
    arrays = checkpoint
    names, shape_of, get = sorted(arrays), lambda n: tuple(arrays[n].shape), arrays.__getitem__
  else:
    names, shape_of, get = checkpoint.names(), checkpoint.shape, checkpoint.get
  spec = spec or spec_from_model(model)
  abstract = _abstract_params(model)
  entries = _entries(spec)
  expected_names = {e[0] for e in entries}
  for name in names:
    tied_head = spec.tie_embeddings and name == "lm_head.weight"
    if name not in expected_names and not tied_head and not _IGNORED.search(name):
      raise ValueError(f"{name}: unexpected tensor for {spec.architecture} with "
                       f"{spec.num_layers} layers (tie_word_embeddings={spec.tie_embeddings}, "
                       f"qkv bias={spec.use_qkv_bias})")
  present = set(names)
  leaves: dict[tuple[str, ...], Any] = {}
  for name, sub, kind, layer in entries:
    if layer is None:
      path, index = sub, None
    else:
      prefix, index = _layer_path(model, layer)
      path = prefix + sub
    if path not in abstract:
      raise ValueError(f"{name}: the model has no parameter {'/'.join(path)}")
    target = abstract[path]
    full = tuple(target.shape)
    s = full[1:] if index is not None else full
    want = _hf_shape(kind, s)
    if name not in present:
      raise ValueError(f"{name}: missing from the checkpoint (expected shape {want})")
    found = shape_of(name)
    if found != want:
      raise ValueError(f"{name}: expected shape {want}, found {found}")
    value = _to_effx(kind, np.asarray(get(name)), s).astype(target.dtype)
    if path not in leaves:
      leaves[path] = np.zeros(full, target.dtype)
    dest = leaves[path] if index is None else leaves[path][index]
    if kind in ("gate", "up"):
      dest[:, 0 if kind == "gate" else 1, :] = value
    else:
      dest[...] = value
  missing = sorted("/".join(p) for p in abstract if p not in leaves)
  if missing:
    raise ValueError(f"model parameters with no HF tensor: {missing}")
  return traverse_util.unflatten_dict({p: jnp.asarray(a) for p, a in leaves.items()})


def load_params(directory: str, model: DecoderLM, spec: HFSpec | None = None) -> dict:
  """The (unboxed) params of `model` from the checkpoint in `directory` (see convert_params)."""
  return convert_params(SafetensorsCheckpoint(directory), model,
                        spec or read_spec(directory))


def load_hf(directory: str, **model_kwargs) -> tuple[DecoderLM, dict]:
  """(model, params) of a HF checkpoint directory; kwargs go to `build_model`.

  `params` are unboxed: `model.apply({"params": params}, tokens)`.
  """
  spec = read_spec(directory)
  model = build_model(spec, **model_kwargs)
  return model, load_params(directory, model, spec)


def params_to_hf(model: DecoderLM, params: Any, spec: HFSpec | None = None
                 ) -> dict[str, np.ndarray]:
  """effx params -> {HF tensor name: numpy array} (the inverse of `convert_params`)."""
  spec = spec or spec_from_model(model)
  params = nn.unbox(params)
  if "params" in params and "embed" not in params:
    params = params["params"]
  flat = traverse_util.flatten_dict(params)
  out = {}
  for name, sub, kind, layer in _entries(spec):
    if layer is None:
      path, index = sub, None
    else:
      prefix, index = _layer_path(model, layer)
      path = prefix + sub
    if path not in flat:
      raise ValueError(f"{name}: params have no {'/'.join(path)}")
    a = np.asarray(jax.device_get(flat[path]))
    out[name] = np.ascontiguousarray(_to_hf(kind, a if index is None else a[index]))
  return out


def export_hf(model: DecoderLM, params: Any, directory: str, *, architecture: str | None = None,
              config_overrides: Mapping[str, Any] | None = None) -> str:
  """Writes `config.json` + `model.safetensors` of `model`/`params` in the HF layout.

  Tensors keep the parameter dtype (no conversion, so `load_hf` gives the same params back
  bit for bit). `config_overrides` (e.g. bos/eos token ids) are merged into config.json.
  Returns the directory.
  """
  from safetensors.numpy import save_file
  spec = spec_from_model(model, architecture)
  tensors = params_to_hf(model, params, spec)
  config = config_from_spec(spec, model.param_dtype)
  config.update(config_overrides or {})
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  return directory


# --------------------------------------------------------------------------- Medusa heads

_MEDUSA_BLOCK = re.compile(r"^(\d+)\.(\d+)\.linear\.(weight|bias)$")
_MEDUSA_HEAD = re.compile(r"^(\d+)\.(\d+)\.weight$")


def load_medusa_heads(path: str, *, embed_dim: int | None = None, vocab_size: int | None = None,
                      dtype: Any = jnp.float32, param_dtype: Any = jnp.float32
                      ) -> tuple[Any, dict]:
  """A published Medusa checkpoint -> (`MedusaHeads`, its variables {"params": ...}).

  `path` is `medusa_lm_head.safetensors` or a directory holding it. The original model is, per
  head k, `nn.Sequential(*[ResBlock(E)] * n, nn.Linear(E, V, bias=False))` with
  ResBlock(x) = x + SiLU(linear(x)), so the keys are `{k}.{i}.linear.weight` [E, E] /
  `{k}.{i}.linear.bias` [E] for blocks i < n and `{k}.{n}.weight` [V, E] for the head's LM head
  (an optional `medusa_head.` prefix is stripped). Note that `[ResBlock(E)] * n` is ONE block
  applied n times (shared weights); safetensors stores shared tensors once, so a file may hold
  only block 0. Mapping: effx `num_blocks = n` (read from the LM head's index), and every effx
  block b < n of head k gets the stored block i = b when present, else block 0 (the shared one):

      {k}.{i}.linear.weight [E, E] -> head_{k}_block_{b}/linear/kernel [E, E] (transposed)
      {k}.{i}.linear.bias [E]      -> head_{k}_block_{b}/linear/bias [E]
      {k}.{n}.weight [V, E]        -> head_{k}_lm_head/kernel [E, V] (transposed)

  which computes the same function (effx blocks are independent, so they may diverge if the
  heads are trained further). `embed_dim` / `vocab_size`, if given (the base model's), are
  checked. The heads read the base model's hidden state after its final norm, as Medusa's do.
  """
  from safetensors import safe_open

  from effx.decoding.heads import MedusaHeads  # same floor (loops); imported when used
  file = os.path.join(path, "medusa_lm_head.safetensors") if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise FileNotFoundError(f"load_medusa_heads: no such file {file!r}")
  with safe_open(file, framework="numpy") as f:
    raw = {k: f.get_tensor(k) for k in f.keys()}
  tensors = {k.removeprefix("medusa_head."): v for k, v in raw.items()}
  blocks: dict[int, dict[int, dict[str, np.ndarray]]] = {}
  lm: dict[int, tuple[int, np.ndarray, str]] = {}
  for key, value in tensors.items():
    if m := _MEDUSA_BLOCK.match(key):
      blocks.setdefault(int(m[1]), {}).setdefault(int(m[2]), {})[m[3]] = (value, key)
    elif m := _MEDUSA_HEAD.match(key):
      if int(m[1]) in lm:
        raise ValueError(f"{key}: head {m[1]} has two LM heads")
      lm[int(m[1])] = (int(m[2]), value, key)
    else:
      raise ValueError(f"{key}: unexpected tensor in a Medusa checkpoint (expected "
                       f"'{{k}}.{{i}}.linear.weight/bias' and '{{k}}.{{n}}.weight')")
  num_heads = len(lm)
  if num_heads == 0 or sorted(lm) != list(range(num_heads)):
    raise ValueError(f"medusa heads: LM heads for heads {sorted(lm)}; expected 0..K-1")
  n = lm[0][0]
  vocab, width = lm[0][1].shape if lm[0][1].ndim == 2 else (None, None)
  if vocab is None:
    raise ValueError(f"{lm[0][2]}: expected a 2-D [vocab, embed] weight, found "
                     f"{lm[0][1].shape}")
  width = embed_dim or width
  vocab = vocab_size or vocab
  params: dict[str, Any] = {}
  for k in range(num_heads):
    index, weight, key = lm[k]
    if index != n:
      raise ValueError(f"{key}: LM head at index {index}, head 0 has it at {n}")
    if weight.shape != (vocab, width):
      raise ValueError(f"{key}: expected shape {(vocab, width)}, found {weight.shape}")
    stored = blocks.get(k, {})
    if any(i >= n for i in stored):
      raise ValueError(f"{k}.{max(stored)}.linear.weight: block index >= the LM head's {n}")
    if n and 0 not in stored:
      raise ValueError(f"{k}.0.linear.weight: missing from the checkpoint (expected shape "
                       f"{(width, width)})")
    for b in range(n):
      block = stored.get(b, stored.get(0))
      for part, want in (("weight", (width, width)), ("bias", (width,))):
        if part not in block:
          raise ValueError(f"{k}.{b}.linear.{part}: missing from the checkpoint (expected "
                           f"shape {want})")
        value, name = block[part]
        if value.shape != want:
          raise ValueError(f"{name}: expected shape {want}, found {value.shape}")
      params[f"head_{k}_block_{b}"] = {"linear": {
          "kernel": jnp.asarray(block["weight"][0].T, param_dtype),
          "bias": jnp.asarray(block["bias"][0], param_dtype)}}
    params[f"head_{k}_lm_head"] = {"kernel": jnp.asarray(weight.T, param_dtype)}
  heads = MedusaHeads(num_heads=num_heads, vocab_size=vocab, num_blocks=n, dtype=dtype,
                      param_dtype=param_dtype)
  return heads, {"params": params}


__all__ = ["ARCHITECTURES", "HFSpec", "SafetensorsCheckpoint", "build_model", "config_from_spec",
           "convert_params", "describe_model", "export_hf", "load_hf", "load_medusa_heads",
           "load_params", "params_to_hf", "read_spec", "spec_from_config", "spec_from_model"]
