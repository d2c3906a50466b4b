"""PyTorch checkpoints of the reference architectures -> flax variables of this package (and back).

Four architectures are supported by name (``ARCHS``), each with PyTorch's ``state_dict`` naming:

- ``generator``: CycleGAN ``ResnetGenerator`` (junyanz/pytorch-CycleGAN-and-pix2pix), ``model.N...`` keys; with
  ``use_dropout`` every residual block has an ``nn.Dropout`` at ``conv_block.4``, which moves its second conv from
  ``conv_block.5`` to ``conv_block.6``;
- ``discriminator``: pix2pix ``NLayerDiscriminator`` (``model.N...``);
- ``unet``: milesial/Pytorch-UNet (2020, bilinear): ``inc``, ``down{i}.maxpool_conv.1``, ``up{i}.conv``, ``outc``;
- ``densefcn``: bfortuner/pytorch_tiramisu FC-DenseNet (67 by default).

The key rule is :mod:`cmedl_jax.models.torch_names` (``a.0.b.1.weight`` -> ``params/a_0/b_1/kernel``); this module
adds its inverse, so that a checkpoint is checked key by key in PyTorch terms before anything is converted:
:class:`WeightImportError` lists every missing key (with the shape the architecture expects), every unexpected key
(with the shape found) and every shape mismatch (expected and found), plus hints for common causes (dropout index
shift, a wrapper prefix). Nothing here imports torch, except :func:`load_checkpoint`, which needs it to read a
file (``torch.load(path, map_location="cpu", weights_only=True)``).

Architecture options (``DEFAULT_OPTIONS``) use this package's attribute names; any option not given is read off
the checkpoint's shapes (:func:`infer_options`), so ``convert_arch("generator", state_dict)`` needs no options at all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from flax import serialization, traverse_util

from cmedl_jax.models import build, torch_names

ARCHS = ("generator", "discriminator", "unet", "densefcn")

# PyTorch reference argument -> option here: ngf = base_features, n_blocks = num_blocks, input_nc =
# input_channels, output_nc = output_channels, ndf = base_features, n_layers = num_layers, n_classes =
# num_classes, out_chans_first_conv = first_conv_features (see docs/pytorch.md).
DEFAULT_OPTIONS: Mapping[str, Mapping[str, Any]] = {
    "generator": dict(input_channels=1, output_channels=1, base_features=64, num_blocks=9, num_downsampling=2,
                      use_dropout=False),
    "discriminator": dict(input_channels=1, base_features=64, num_layers=3),
    "unet": dict(input_channels=1, num_classes=2, features=(64, 128, 256, 512, 512), conv_bias=True),
    "densefcn": dict(input_channels=1, num_classes=2, down_blocks=(5, 5, 5, 5, 5), up_blocks=(5, 5, 5, 5, 5),
                     bottleneck_layers=5, growth_rate=16, first_conv_features=48),
}
_TUPLE_OPTIONS = ("features", "down_blocks", "up_blocks")

# Wrappers around a state_dict in common checkpoint formats, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module")
# Prefixes added by nn.DataParallel / DistributedDataParallel ("module.") and torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

VARIABLES_FILE = "variables.msgpack"
ARCH_FILE = "arch.json"

_FLAX_TO_TORCH_LEAF = {"kernel": "weight", "transposed_kernel": "weight", "scale": "weight", "bias": "bias",
                       "mean": "running_mean", "var": "running_var"}
_INDEXED_NAME = re.compile(r"^(.+?)((?:_\d+)+)$")
_MAX_LISTED = 20


class WeightImportError(ValueError):
  """A checkpoint does not fit the architecture; every problem is named in PyTorch terms.

  Attributes:
    missing: [(key, expected PyTorch shape)] keys the architecture needs that the checkpoint lacks.
    unexpected: [(key, found shape)] checkpoint keys the architecture has no place for.
    mismatched: [(key, expected shape, found shape)].
    hints: likely causes, in words.
  """

  def __init__(self, what: str, missing=(), unexpected=(), mismatched=(), hints=(), headline=None):
    self.missing, self.unexpected = list(missing), list(unexpected)
    self.mismatched, self.hints = list(mismatched), list(hints)
    lines = [headline or f"the checkpoint does not fit {what}:"]
    lines += _listed(f"missing key {k}: expected shape {s}" for k, s in self.missing)
    lines += _listed(f"unexpected key {k}: found shape {s}" for k, s in self.unexpected)
    lines += _listed(f"shape mismatch {k}: expected {e}, found {f}" for k, e, f in self.mismatched)
    lines += [f"hint: {h}" for h in self.hints]
    super().__init__("\n  ".join(lines))


def _listed(lines):
  lines = list(lines)
  extra = len(lines) - _MAX_LISTED
  return lines[:_MAX_LISTED] + ([f"... and {extra} more"] if extra > 0 else [])


# ------------------------------------------------------------------------------------------------ key mapping
def torch_key(flax_path: Sequence[str]) -> str:
  """The PyTorch key of a flax variable path: ("params", "model_10", "conv_block_5", "kernel") ->
  ``model.10.conv_block.5.weight``; ("batch_stats", "up2", "conv", "double_conv_4", "var") ->
  ``up2.conv.double_conv.4.running_var``.

  Inverse of :func:`cmedl_jax.models.torch_names.module_path` for module names whose own name does not end in
  ``_<digits>`` (true of every architecture in ``ARCHS``; not of CUT's ``mlp_0`` head).
  """
  *modules, leaf = flax_path[1:]
  parts = []
  for name in modules:
    match = _INDEXED_NAME.match(name)
    if match:
      parts.append(match.group(1))
      parts.extend(match.group(2).split("_")[1:])
    else:
      parts.append(name)
  return ".".join(parts + [_FLAX_TO_TORCH_LEAF[leaf]])


def torch_shape(leaf: str, flax_shape: Sequence[int]) -> tuple[int, ...]:
  """PyTorch's shape of a flax leaf: conv (kh, kw, in, out) -> (out, in, kh, kw); transposed conv
  (kh, kw, in, out) -> (in, out, kh, kw); linear (in, out) -> (out, in); the rest unchanged."""
  shape = tuple(int(d) for d in flax_shape)
  axes = torch_names.torch_to_flax_axes(leaf, len(shape))
  return shape if axes is None else tuple(shape[i] for i in np.argsort(axes))


def to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  """A flax array in PyTorch's layout (the inverse of :func:`torch_names.torch_to_flax_axes`)."""
  axes = torch_names.torch_to_flax_axes(leaf, value.ndim)
  return value if axes is None else np.transpose(value, np.argsort(axes))


def expected_torch_keys(target: Mapping[str, Any]) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """{PyTorch key: (flax path, PyTorch shape)} for every variable of ``target`` (arrays or ShapeDtypeStructs)."""
  expected = {}
  for path, leaf in traverse_util.flatten_dict(dict(target)).items():
    key = torch_key(path)
    # The forward rule must send the key back to the same place, else the names here are not PyTorch's.
    assert torch_names.module_path(key) == tuple(path[1:-1]), (key, path)
    expected[key] = (tuple(path), torch_shape(path[-1], leaf.shape))
  return expected


def variables_to_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flax variables -> {PyTorch key: numpy array in PyTorch layout} (``num_batches_tracked`` not included)."""
  out = {}
  for path, value in traverse_util.flatten_dict(dict(variables)).items():
    out[torch_key(path)] = np.ascontiguousarray(to_torch_layout(path[-1], np.asarray(value)))
  return out


# ------------------------------------------------------------------------------------------ reading checkpoints
def _is_array(value) -> bool:
  return hasattr(value, "shape") and hasattr(value, "dtype")


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor: half / bfloat16 have no numpy twin, so go through float32
    value = value.detach().cpu()
    value = value.float() if value.is_floating_point() else value
    value = value.numpy()
  array = np.array(value, copy=True)  # never share memory with a live PyTorch module
  return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array


def extract_state_dict(checkpoint: Any, key: Optional[str] = None, prefix: Optional[str] = None):
  """Finds the ``state_dict`` in a loaded checkpoint and normalises its keys.

  Args:
    checkpoint: what ``torch.load`` returned: a state_dict, or a dict wrapping one (``{"state_dict": ...}``,
      ``{"model_state_dict": ...}``, ``{"model": ...}``, ...; searched recursively).
    key: dotted path of the state_dict inside the checkpoint (e.g. ``"netG_A"``), instead of the search.
    prefix: keep only keys starting with ``prefix`` and remove it (e.g. ``"netG_A."`` for one network of a
      multi-network checkpoint).

  Returns:
    ``(state_dict, ignored)``: {key: tensor or array} with DataParallel ``module.`` / torch.compile
    ``_orig_mod.`` prefixes removed, and the names of non-tensor entries that were dropped (e.g. milesial's
    ``mask_values``).

  Raises:
    WeightImportError: no state_dict found, or ``key`` / ``prefix`` select nothing.
  """
  obj = checkpoint
  if key:
    for part in key.split("."):
      if not isinstance(obj, Mapping) or part not in obj:
        found = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise WeightImportError(key, headline=f"--key {key!r} selects nothing:",
                                hints=[f"no entry {part!r}; the checkpoint has {found}"])
      obj = obj[part]
  obj = _find_tensors(obj)
  if obj is None:
    top = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
    raise WeightImportError("", headline="no PyTorch state_dict found:", hints=[
        f"no mapping of tensors (top-level entries: {top}); select one with --key"])
  state_dict = {k: v for k, v in obj.items() if _is_array(v)}
  ignored = sorted(str(k) for k, v in obj.items() if not _is_array(v))
  state_dict = {_strip_wrapper_prefixes(k): v for k, v in state_dict.items()}
  if prefix:
    selected = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not selected:
      raise WeightImportError(prefix, headline=f"--prefix {prefix!r} selects nothing:",
                              hints=[f"no key starts with it; keys look like {sorted(state_dict)[:3]}"])
    state_dict = selected
  return state_dict, ignored


def _find_tensors(obj):
  if not isinstance(obj, Mapping):
    return None
  if any(_is_array(v) for v in obj.values()):
    return obj
  for wrapper in WRAPPER_KEYS:
    if isinstance(obj.get(wrapper), Mapping):
      found = _find_tensors(obj[wrapper])
      if found is not None:
        return found
  return None


def _strip_wrapper_prefixes(key: str) -> str:
  stripped = True
  while stripped:
    stripped = False
    for prefix in WRAPPER_PREFIXES:
      if key.startswith(prefix):
        key, stripped = key[len(prefix):], True
  return key


def load_checkpoint(path: str, key: Optional[str] = None, prefix: Optional[str] = None):
  """Reads a PyTorch file with ``torch.load(path, map_location="cpu", weights_only=True)`` and returns
  :func:`extract_state_dict`'s ``(state_dict, ignored)``.

  ``weights_only`` never runs code from the file; checkpoints that pickle custom classes are refused (re-save
  their ``state_dict`` alone).
  """
  import torch  # the one place in this module that needs torch

  try:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  except FileNotFoundError:
    raise
  except Exception as e:  # torch raises UnpicklingError / RuntimeError subclasses that vary by version
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if line.strip()]
    reason = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else repr(e))
    raise WeightImportError(path, headline=f"{path}: cannot be read safely:", hints=[
        f"torch.load(weights_only=True) failed: {reason}", "files holding pickled objects other than tensors and "
        "plain containers are refused (nothing in them is run); re-save the model's state_dict() alone"]) from e
  return extract_state_dict(checkpoint, key, prefix)


# ------------------------------------------------------------------------------------------ options and modules
def _shape(state_dict, key):
  return tuple(state_dict[key].shape) if key in state_dict else None


def _indices(state_dict, pattern):
  regex = re.compile(pattern)
  return sorted({int(m.group(1)) for k in state_dict for m in [regex.match(k)] if m})


def infer_options(arch: str, state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The options of ``arch`` that can be read off the checkpoint's keys and shapes (a partial dict)."""
  _check_arch(arch)
  sd, out = state_dict, {}
  if arch == "generator":
    if (w := _shape(sd, "model.1.weight")) and len(w) == 4:
      out.update(base_features=w[0], input_channels=w[1])
    blocks = _indices(sd, r"model\.(\d+)\.conv_block\.")
    if blocks:
      out.update(num_blocks=len(blocks), num_downsampling=(blocks[0] - 4) // 3,
                 use_dropout=any(".conv_block.6." in k for k in sd))
    convs = [i for i in _indices(sd, r"model\.(\d+)\.weight$") if len(_shape(sd, f"model.{i}.weight")) == 4]
    if convs:
      out["output_channels"] = _shape(sd, f"model.{convs[-1]}.weight")[0]
  elif arch == "discriminator":
    if w := _shape(sd, "model.0.weight"):
      out.update(base_features=w[0], input_channels=w[1])
    convs = [i for i in _indices(sd, r"model\.(\d+)\.weight$") if len(_shape(sd, f"model.{i}.weight")) == 4]
    if len(convs) >= 2:
      out["num_layers"] = len(convs) - 2
  elif arch == "unet":
    if w := _shape(sd, "inc.double_conv.0.weight"):
      widths, i = [w[0]], 1
      while d := _shape(sd, f"down{i}.maxpool_conv.1.double_conv.0.weight"):
        widths.append(d[0])
        i += 1
      out.update(input_channels=w[1], features=tuple(widths), conv_bias="inc.double_conv.0.bias" in sd)
    if w := _shape(sd, "outc.conv.weight"):
      out["num_classes"] = w[0]
  elif arch == "densefcn":
    if w := _shape(sd, "firstconv.weight"):
      out.update(first_conv_features=w[0], input_channels=w[1])
    if w := _shape(sd, "denseBlocksDown.0.layers.0.conv.weight"):
      out["growth_rate"] = w[0]
    for name, attr in (("denseBlocksDown", "down_blocks"), ("denseBlocksUp", "up_blocks")):
      blocks = _indices(sd, rf"{name}\.(\d+)\.")
      if blocks:
        out[attr] = tuple(len(_indices(sd, rf"{name}\.{b}\.layers\.(\d+)\.")) for b in blocks)
    layers = _indices(sd, r"bottleneck\.bottleneck\.layers\.(\d+)\.")
    if layers:
      out["bottleneck_layers"] = len(layers)
    if w := _shape(sd, "finalConv.weight"):
      out["num_classes"] = w[0]
  return {k: tuple(int(x) for x in v) if isinstance(v, tuple) else (v if isinstance(v, bool) else int(v))
          for k, v in out.items()}


def resolve_options(arch: str, state_dict: Optional[Mapping[str, Any]] = None,
                    options: Optional[Mapping[str, Any]] = None) -> tuple[dict[str, Any], tuple[str, ...]]:
  """Defaults < values read off ``state_dict`` < explicit ``options``.

  Returns:
    ``(options, inferred)``: the full option dict and the names taken from the checkpoint.
  """
  _check_arch(arch)
  given = {k: v for k, v in dict(options or {}).items() if v is not None}
  unknown = sorted(set(given) - set(DEFAULT_OPTIONS[arch]))
  if unknown:
    raise ValueError(f"unknown options for {arch}: {unknown}; expected some of {sorted(DEFAULT_OPTIONS[arch])}")
  inferred = {k: v for k, v in infer_options(arch, state_dict or {}).items() if k not in given}
  resolved = {**DEFAULT_OPTIONS[arch], **inferred, **given}
  resolved = {k: tuple(v) if k in _TUPLE_OPTIONS else v for k, v in resolved.items()}
  return resolved, tuple(sorted(inferred))


def build_module(arch: str, options: Mapping[str, Any]):
  """The flax module of ``arch`` and the arguments that build its variables.

  Returns:
    ``(module, input_shape, init_kwargs)``: ``models.abstract_variables(module, input_shape, **init_kwargs)`` gives
    the variable shapes (nothing allocated).
  """
  _check_arch(arch)
  o = {**DEFAULT_OPTIONS[arch], **dict(options)}
  channels = int(o["input_channels"])
  if arch == "generator":
    module = build.build_generator(output_channels=o["output_channels"], base_features=o["base_features"],
                                   num_blocks=o["num_blocks"], num_downsampling=o["num_downsampling"],
                                   use_dropout=bool(o["use_dropout"]))
    size, kwargs = 16 * 2 ** o["num_downsampling"], {}
  elif arch == "discriminator":
    module = build.build_discriminator(base_features=o["base_features"], num_layers=o["num_layers"])
    size, kwargs = max(32, 2 ** (o["num_layers"] + 2)), {}
  elif arch == "unet":
    module = build.build_segmenter("unet", o["num_classes"], features=tuple(o["features"]),
                                   conv_bias=bool(o["conv_bias"]))
    size, kwargs = 4 * 2 ** (len(o["features"]) - 1), {"train": False}
  else:
    module = build.build_segmenter("densefcn", o["num_classes"], down_blocks=tuple(o["down_blocks"]),
                                   up_blocks=tuple(o["up_blocks"]), bottleneck_layers=o["bottleneck_layers"],
                                   growth_rate=o["growth_rate"], first_conv_features=o["first_conv_features"])
    size, kwargs = 4 * 2 ** len(o["down_blocks"]), {"train": False}
  return module, (1, size, size, channels), kwargs


def _check_arch(arch):
  if arch not in ARCHS:
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def describe(arch: str, options: Mapping[str, Any]) -> str:
  return f"{arch}(" + ", ".join(f"{k}={v}" for k, v in sorted(options.items())) + ")"


# ------------------------------------------------------------------------------------------------- conversion
def convert_state_dict(state_dict: Mapping[str, Any], target: Mapping[str, Any], *, what: str = "the network",
                       ignore_unused_norm_buffers: bool = False):
  """Checks ``state_dict`` against ``target`` key by key, then converts it.

  Args:
    state_dict: {PyTorch key: tensor or array}.
    target: flax variables or their ``jax.eval_shape`` (``models.abstract_variables``).
    what: the network, for messages.
    ignore_unused_norm_buffers: drop ``running_mean`` / ``running_var`` / ``num_batches_tracked`` of modules that
      have no variables here (instance norms saved by PyTorch < 0.4, which tracked statistics by default; the
      CycleGAN code deletes them the same way when loading).

  Returns:
    ``(variables, ignored)``: nested dict of float32 numpy arrays shaped like ``target``; names of the checkpoint
    entries that were skipped (``num_batches_tracked`` counters, and the buffers above).

  Raises:
    WeightImportError: missing or unexpected keys or shape mismatches (all of them, in one message).
  """
  expected = expected_torch_keys(target)
  modules_with_stats = {k.rsplit(".", 1)[0] for k in expected if k.endswith(".running_mean")}
  modules = {k.rsplit(".", 1)[0] for k in expected}
  kept, ignored, unexpected, mismatched = {}, [], [], []
  for key, value in state_dict.items():
    module, leaf = key.rsplit(".", 1) if "." in key else ("", key)
    if key not in expected:
      if leaf == "num_batches_tracked" and module in modules_with_stats:
        ignored.append(key)
      elif (ignore_unused_norm_buffers and leaf in ("running_mean", "running_var", "num_batches_tracked")
            and module not in modules):
        ignored.append(key)
      else:
        unexpected.append((key, tuple(value.shape)))
      continue
    if tuple(value.shape) != expected[key][1]:
      mismatched.append((key, expected[key][1], tuple(value.shape)))
    kept[key] = value
  missing = [(k, shape) for k, (_, shape) in expected.items() if k not in state_dict]
  if missing or unexpected or mismatched:
    raise WeightImportError(what, missing, unexpected, mismatched, _hints(missing, unexpected))
  variables = torch_names.torch_state_dict_to_variables({k: _to_numpy(v) for k, v in kept.items()}, target)
  return variables, sorted(ignored)


def _hints(missing, unexpected):
  hints = []
  missing_keys, unexpected_keys = [k for k, _ in missing], [k for k, _ in unexpected]
  if any(".conv_block.6." in k for k in unexpected_keys) and any(".conv_block.5." in k for k in missing_keys):
    hints.append("the residual blocks' second conv is at conv_block.6, so the network was built with "
                 "use_dropout (nn.Dropout is conv_block.4): set use_dropout=True (--use-dropout)")
  if any(".conv_block.5." in k for k in unexpected_keys) and any(".conv_block.6." in k for k in missing_keys):
    hints.append("the residual blocks' second conv is at conv_block.5, so the network was built without "
                 "dropout: set use_dropout=False (--no-dropout)")
  missing_set = set(missing_keys)
  for head in sorted({k.split(".", 1)[0] for k in unexpected_keys if "." in k}):
    if any(k.split(".", 1)[1] in missing_set for k in unexpected_keys if k.startswith(head + ".")):
      hints.append(f"the keys under {head!r} fit once that prefix is removed: select them with --prefix {head}.")
  return hints


@dataclasses.dataclass
class Conversion:
  """The result of :func:`convert_arch`.

  Attributes:
    arch: architecture name.
    options: the resolved options (build the flax module with :func:`build_module`).
    inferred: option names read off the checkpoint.
    variables: {"params": ..., ["batch_stats": ...]} nested dicts of float32 numpy arrays.
    ignored: checkpoint entries that were skipped on purpose.
    num_tensors: tensors converted.
  """

  arch: str
  options: dict
  inferred: tuple
  variables: dict
  ignored: list
  num_tensors: int

  def module(self):
    return build_module(self.arch, self.options)[0]

  def num_parameters(self) -> int:
    return int(sum(np.size(v) for v in traverse_util.flatten_dict(self.variables.get("params", {})).values()))


def convert_arch(arch: str, state_dict: Mapping[str, Any], options: Optional[Mapping[str, Any]] = None,
            ignored: Sequence[str] = ()) -> Conversion:
  """Converts a PyTorch ``state_dict`` of ``arch`` (options not given are read off the checkpoint).

  Raises:
    WeightImportError: the checkpoint does not fit the architecture (see :func:`convert_state_dict`).
  """
  resolved, inferred = resolve_options(arch, state_dict, options)
  module, shape, kwargs = build_module(arch, resolved)
  target = build.abstract_variables(module, shape, **kwargs)
  variables, skipped = convert_state_dict(state_dict, target, what=describe(arch, resolved),
                                          ignore_unused_norm_buffers=arch in ("generator", "discriminator"))
  return Conversion(arch, resolved, inferred, variables, sorted(list(ignored) + skipped),
                    len(state_dict) - len(skipped))


def convert_file(arch: str, path: str, options: Optional[Mapping[str, Any]] = None, key: Optional[str] = None,
                 prefix: Optional[str] = None) -> Conversion:
  """:func:`load_checkpoint` + :func:`convert_arch` (needs torch)."""
  state_dict, ignored = load_checkpoint(path, key, prefix)
  return convert_arch(arch, state_dict, options, ignored)


# ----------------------------------------------------------------------------------------------- saving
def save(conversion: Conversion, out_dir: str, source: Optional[str] = None) -> dict[str, str]:
  """Writes ``out_dir/variables.msgpack`` (``flax.serialization``) and ``out_dir/arch.json``; returns the paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {"variables": os.path.join(out_dir, VARIABLES_FILE), "arch": os.path.join(out_dir, ARCH_FILE)}
  with open(paths["variables"], "wb") as f:
    f.write(serialization.msgpack_serialize(conversion.variables))
  meta = dict(arch=conversion.arch, options={k: list(v) if isinstance(v, tuple) else v
                                             for k, v in conversion.options.items()},
              inferred_options=list(conversion.inferred), source=source, num_parameters=conversion.num_parameters(),
              num_tensors=conversion.num_tensors, ignored_keys=list(conversion.ignored))
  with open(paths["arch"], "w") as f:
    json.dump(meta, f, indent=2)
    f.write("\n")
  return paths


def load(out_dir: str):
  """Reads what :func:`save` wrote: ``(flax module, variables, metadata)``; shapes are checked."""
  with open(os.path.join(out_dir, ARCH_FILE)) as f:
    meta = json.load(f)
  options = {k: tuple(v) if k in _TUPLE_OPTIONS else v for k, v in meta["options"].items()}
  module, shape, kwargs = build_module(meta["arch"], options)
  with open(os.path.join(out_dir, VARIABLES_FILE), "rb") as f:
    variables = serialization.msgpack_restore(f.read())
  target = build.abstract_variables(module, shape, **kwargs)
  flat, flat_target = traverse_util.flatten_dict(variables), traverse_util.flatten_dict(dict(target))
  if {k: v.shape for k, v in flat.items()} != {k: v.shape for k, v in flat_target.items()}:
    raise ValueError(f"{out_dir}: {VARIABLES_FILE} does not match {describe(meta['arch'], options)}")
  return module, variables, meta
