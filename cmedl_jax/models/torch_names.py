"""The naming rule between PyTorch ``state_dict`` keys and this package's flax variables.

Every module here names its submodules after the attribute path of the reference PyTorch module, with each
``nn.Sequential`` / ``nn.ModuleList`` index appended to the preceding name by "_". So a key maps mechanically:

  ``model.10.conv_block.5.weight``             -> ("params", "model_10", "conv_block_5", "kernel")
  ``down1.maxpool_conv.1.double_conv.0.weight`` -> ("params", "down1", "maxpool_conv_1", "double_conv_0", "kernel")
  ``ppm.features.0.2.running_var``              -> ("batch_stats", "ppm", "features_0_2", "var")

Leaf names and array layouts:

=====================  ==========================  ====================================================
PyTorch                flax                        array
=====================  ==========================  ====================================================
conv ``weight``        ``kernel``                  (out, in, kh, kw) -> (kh, kw, in, out)
conv-T ``weight``      ``transposed_kernel``       (in, out, kh, kw) -> (kh, kw, in, out)
linear ``weight``      ``kernel``                  (out, in) -> (in, out)
``bias``               ``bias``                    unchanged
BN ``weight``          ``scale``                   unchanged
BN ``running_mean``    ``mean`` (batch_stats)      unchanged
BN ``running_var``     ``var`` (batch_stats)       unchanged
``num_batches_tracked``  (none)                    dropped
=====================  ==========================  ====================================================

Which of ``kernel`` / ``transposed_kernel`` / ``scale`` a ``weight`` becomes depends on the flax module, so
:func:`torch_state_dict_to_variables` resolves it against the target variables.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import traverse_util

_BN_STATS = {"running_mean": "mean", "running_var": "var"}


def module_path(torch_key: str) -> tuple[str, ...]:
  """The flax module path of a PyTorch key without its leaf: ``"a.0.b.1.2.weight"`` -> ("a_0", "b_1_2")."""
  parts = torch_key.split(".")[:-1]
  path = []
  for part in parts:
    if part.isdigit() and path:
      path[-1] = f"{path[-1]}_{part}"
    else:
      path.append(part)
  return tuple(path)


def torch_to_flax_axes(leaf: str, ndim: int):
  """The transpose taking a PyTorch array to the flax layout of ``leaf`` (None: unchanged).

  Conv weight (out, in, kh, kw) -> kernel (kh, kw, in, out); ConvTranspose weight (in, out, kh, kw) ->
  transposed_kernel (kh, kw, in, out); Linear weight (out, in) -> kernel (in, out).
  """
  if leaf == "kernel" and ndim == 4:
    return (2, 3, 1, 0)
  if leaf == "transposed_kernel":
    return (2, 3, 0, 1)
  if leaf == "kernel" and ndim == 2:
    return (1, 0)
  return None


def _convert(leaf: str, value: np.ndarray) -> np.ndarray:
  axes = torch_to_flax_axes(leaf, value.ndim)
  return value if axes is None else np.transpose(value, axes)


def torch_state_dict_to_variables(state_dict: Mapping[str, Any], target: Mapping[str, Any]) -> dict:
  """Converts a PyTorch ``state_dict`` into flax variables shaped like ``target``.

  Args:
    state_dict: key -> tensor or array (copied, so later in-place updates of the PyTorch module do not leak in).
    target: variables (or ``jax.eval_shape`` of them) of the flax module, used to resolve leaf names and check
      shapes.

  Returns:
    A nested dict with the same structure as ``target`` (numpy arrays).

  Raises:
    KeyError: a PyTorch key has no flax counterpart, or a flax variable is not covered by the state_dict.
    ValueError: shapes differ after conversion.
  """
  flat_target = traverse_util.flatten_dict(dict(target))
  out = {}
  for key, tensor in state_dict.items():
    if key.endswith("num_batches_tracked"):
      continue
    # Copy: .numpy() shares memory with the module's buffers, which PyTorch updates in place in training.
    value = np.array(tensor.detach().cpu().numpy() if hasattr(tensor, "detach") else tensor, copy=True)
    leaf_name = key.rsplit(".", 1)[-1]
    path = module_path(key)
    if leaf_name in _BN_STATS:
      candidates = [("batch_stats", *path, _BN_STATS[leaf_name])]
    elif leaf_name == "bias":
      candidates = [("params", *path, "bias")]
    else:
      candidates = [("params", *path, leaf) for leaf in ("kernel", "transposed_kernel", "scale")]
    found = [c for c in candidates if c in flat_target]
    if len(found) != 1:
      raise KeyError(f"PyTorch key {key!r} has no flax variable (looked for {['/'.join(c) for c in candidates]})")
    converted = _convert(found[0][-1], value)
    if tuple(converted.shape) != tuple(flat_target[found[0]].shape):
      raise ValueError(f"{key}: shape {converted.shape} after conversion, flax expects {flat_target[found[0]].shape}")
    out[found[0]] = converted
  missing = sorted("/".join(k) for k in flat_target if k not in out)
  if missing:
    raise KeyError(f"flax variables without a PyTorch counterpart: {missing}")
  return traverse_util.unflatten_dict(out)
