"""Checks a whole run config before anything is built, read or generated.

Each rule raises :class:`~cmedl_jax.errors.ConfigError` naming the field, the value and what is allowed, so a bad
value fails in one line at start-up instead of inside the jitted step. The fields are those of
:func:`cmedl_jax.config_base.base_config`; a field it does not have (a misspelling) is an error too.
"""

from __future__ import annotations

import difflib
import math

import jax
import jax.numpy as jnp

from cmedl_jax import config_base, ops
from cmedl_jax.data import resample
from cmedl_jax.errors import ConfigError
from cmedl_jax.metrics import CONVENTIONS
from cmedl_jax.models.build import SEGMENTERS
from cmedl_jax.train.validation import BEST_METRICS
from cmedl_jax.train import methods
from cmedl_jax.train.networks import COMPUTE_DTYPES, ROLES

# Subtrees whose keys are free (passed on as keyword arguments).
FREE_FORM = ("model.segmenter_kwargs",)


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if hasattr(value, "items") and name not in FREE_FORM:
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def check_known_fields(cfg):
  """Every field of ``cfg`` is a field of the base config (a misspelt one names its nearest match)."""
  known = _flatten(config_base.base_config())
  for name in _flatten(cfg):
    if name not in known:
      near = difflib.get_close_matches(name, list(known), n=1)
      raise ConfigError(name, "no such config field" + (f"; did you mean {near[0]}?" if near else ""))


def _choice(field, value, allowed):
  if value not in allowed:
    raise ConfigError(field, f"{value!r} is not one of {', '.join(map(str, allowed))}")


def _number(field, value, *, minimum=None, above=None, below=None, maximum=None, integer=False):
  """``value`` is a finite (integer) number within the given bounds."""
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  if integer:
    ok = ok and float(value).is_integer()
  bounds = []
  if minimum is not None:
    ok, bounds = ok and value >= minimum, bounds + [f">= {minimum}"]
  if above is not None:
    ok, bounds = ok and value > above, bounds + [f"> {above}"]
  if below is not None:
    ok, bounds = ok and value < below, bounds + [f"< {below}"]
  if maximum is not None:
    ok, bounds = ok and value <= maximum, bounds + [f"<= {maximum}"]
  if not ok:
    kind = "an integer" if integer else "a number"
    raise ConfigError(field, f"{value!r}: must be {kind}" + (f" {' and '.join(bounds)}" if bounds else ""))


def _increasing_pair(field, value, minimum=None, maximum=None):
  if len(value) != 2 or not value[0] < value[1]:
    raise ConfigError(field, f"{tuple(value)!r}: must be (low, high) with low < high")
  for v in value:
    _number(field, v, minimum=minimum, maximum=maximum)


def check_values(cfg, num_devices=None):
  """The value rules of every field (choices, ranges, divisibility by ``num_devices``)."""
  _choice("method", cfg.method, list(methods.METHODS))
  _choice("translator", cfg.translator, list(methods.TRANSLATORS))
  _choice("conv_backend", cfg.conv_backend, ops.BACKENDS)
  _choice("conv_algorithm", cfg.conv_algorithm, ops.ALGORITHMS)
  _choice("compute_dtype", cfg.compute_dtype, COMPUTE_DTYPES)
  d = cfg.data
  if not d.make_phantoms:
    for field in ("ct_dir", "mri_dir"):
      if not d[field]:
        raise ConfigError(f"data.{field}", "set the dataset folder (or data.make_phantoms=True)")
  _number("data.crop_size", d.crop_size, minimum=16, integer=True)
  _number("data.global_batch_size", d.global_batch_size, minimum=1, integer=True)
  if num_devices and d.global_batch_size % num_devices:
    raise ConfigError("data.global_batch_size", f"{d.global_batch_size} is not divisible by the {num_devices} "
                                                "devices of this job")
  _number("data.foreground_fraction", d.foreground_fraction, minimum=0, maximum=1)
  _increasing_pair("data.ct_window", d.ct_window)
  _increasing_pair("data.mri_percentiles", d.mri_percentiles, minimum=0, maximum=100)
  _number("data.num_workers", d.num_workers, minimum=0, integer=True)
  _number("data.val_cases", d.val_cases, minimum=0, integer=True)
  if d.val_cases and cfg.eval.val_dir:
    raise ConfigError("data.val_cases", f"{d.val_cases} with eval.val_dir={cfg.eval.val_dir!r}: validate on one of "
                                        "them (set data.val_cases=0 or eval.val_dir=)")
  try:
    resample.target_inplane(d.target_spacing_mm)
  except (TypeError, ValueError):
    raise ConfigError("data.target_spacing_mm", f"{d.target_spacing_mm!r}: give the in-plane pixel size as one or "
                                                "two positive numbers of mm, or () for each scan's own") from None
  _choice("data.image_interpolation", d.image_interpolation, tuple(resample.IMAGE_ORDERS))
  _choice("data.label_interpolation", d.label_interpolation, resample.LABEL_INTERPOLATIONS)
  a = d.augment
  for field in ("flip_prob", "rotate_prob", "scale_prob"):
    _number(f"data.augment.{field}", a[field], minimum=0, maximum=1)
  _number("data.augment.rotate_max_deg", a.rotate_max_deg, minimum=0, maximum=180)
  _increasing_pair("data.augment.scale_range", a.scale_range, minimum=0.1)
  for modality in ("ct", "mri"):
    section = a[modality]
    for kind in ("brightness", "contrast", "gamma", "noise"):
      _number(f"data.augment.{modality}.{kind}_prob", section[f"{kind}_prob"], minimum=0, maximum=1)
    for kind in ("brightness", "contrast", "gamma"):
      _increasing_pair(f"data.augment.{modality}.{kind}_range", section[f"{kind}_range"], minimum=0.01)
    _number(f"data.augment.{modality}.noise_std_max", section.noise_std_max, minimum=0)
  if d.make_phantoms:
    for field in ("num_ct", "num_mri", "size", "slices"):
      _number(f"data.phantoms.{field}", d.phantoms[field], minimum=1, integer=True)
    _number("data.phantoms.num_test", d.phantoms.num_test, minimum=0, integer=True)

  m = cfg.model
  _choice("model.segmenter", m.segmenter, list(SEGMENTERS))
  _number("model.num_classes", m.num_classes, minimum=2, integer=True)
  _number("model.nce.num_patches", m.nce.num_patches, minimum=1, integer=True)
  _number("model.nce.temperature", m.nce.temperature, above=0)
  lc = cfg.loss
  for field in ("lambda_cycle", "lambda_identity", "lambda_seg", "lambda_hint", "lambda_nce", "dice_weight"):
    _number(f"loss.{field}", lc[field], minimum=0)
  _number("loss.dice_smooth", lc.dice_smooth, above=0)
  _number("pool_size", cfg.pool_size, minimum=0, integer=True)
  for group, o in cfg.optim.items():
    _choice(f"optim.{group}.name", o.name, ("adam", "sgd"))
    _number(f"optim.{group}.lr", o.lr, minimum=0)  # 0 freezes the group
    _number(f"optim.{group}.b1", o.b1, minimum=0, below=1)
    _number(f"optim.{group}.b2", o.b2, minimum=0, below=1)
    _number(f"optim.{group}.decay_start_fraction", o.decay_start_fraction, minimum=0, maximum=1)
    _number(f"optim.{group}.weight_decay", o.weight_decay, minimum=0)
    _number(f"optim.{group}.grad_clip", o.grad_clip, minimum=0)
  t = cfg.train
  _number("train.total_steps", t.total_steps, minimum=1, integer=True)
  _choice("train.backend", t.backend, ("shard_map", "pmap"))
  for field in ("log_every", "checkpoint_every", "keep_checkpoints"):
    _number(f"train.{field}", t[field], minimum=1, integer=True)
  for field in ("preview_every", "prefetch_to_device", "val_every"):
    _number(f"train.{field}", t[field], minimum=0, integer=True)
  e = cfg.eval
  _number("eval.batch_size", e.batch_size, minimum=1, integer=True)
  if not len(e.tolerances_mm):
    raise ConfigError("eval.tolerances_mm", "give at least one surface Dice tolerance (mm)")
  for tolerance in e.tolerances_mm:
    _number("eval.tolerances_mm", tolerance, above=0)
  _choice("eval.hd95_convention", e.hd95_convention, CONVENTIONS)
  _choice("eval.best_metric", e.best_metric, BEST_METRICS)


def check_networks(cfg):
  """The networks of the run accept ``data.crop_size`` crops and have the configured hint and NCE layers.

  Traces the networks' init abstractly (``jax.eval_shape``: nothing is computed or allocated).
  """
  nets = methods.build_networks(cfg, bn_axis_name=None)
  crop = int(cfg.data.crop_size)

  def output(name, size):
    module = nets[name]
    kwargs = {"train": False} if ROLES[name].kind == "segmenter" else {}
    x = jax.ShapeDtypeStruct((1, size, size, nets.in_channels[name]), jnp.float32)
    try:
      with ops.use(ops.Kernels("plain")):  # shapes only: the same in every form
        return jax.eval_shape(lambda v: module.init_with_output(jax.random.key(0), v, **kwargs)[0], x)
    except (TypeError, ValueError) as e:  # e.g. a crop too small for the strided layers
      raise ConfigError("data.crop_size", f"{crop}: network {name} cannot take {crop}x{crop} crops "
                                          f"({str(e).splitlines()[0]})") from None

  for name in nets.names:
    kind = ROLES[name].kind
    if kind == "generator":
      out = output(name, crop)
      if out.shape[1:3] != (crop, crop):
        multiple = 2 ** nets[name].num_downsampling
        raise ConfigError("data.crop_size", f"{crop}: the generator maps {crop}x{crop} crops to "
                                            f"{out.shape[1]}x{out.shape[2]}; use a multiple of {multiple}, e.g. "
                                            f"{max(multiple, crop // multiple * multiple)}")
      layers = nets[name].num_layers()
      bad = [layer for layer in cfg.model.nce.layers if not 0 <= layer < layers]
      if bad and "nce_head" in nets:
        raise ConfigError("model.nce.layers", f"{list(bad)}: the generator's layers are 0 .. {layers - 1}")
    elif kind == "segmenter":
      logits, features = output(name, crop)
      if logits.shape[1:3] != (crop, crop):
        raise ConfigError("data.crop_size", f"{crop}: {cfg.model.segmenter} maps {crop}x{crop} crops to "
                                            f"{logits.shape[1]}x{logits.shape[2]}")
      missing = [f for f in cfg.model.hint_features if f not in features]
      if missing:
        raise ConfigError("model.hint_features", f"{missing}: {cfg.model.segmenter} has the decoder features "
                                                 f"{', '.join(sorted(features))}")
    elif kind == "discriminator":
      out = output(name, crop)
      if min(out.shape[1:3]) < 1:
        raise ConfigError("data.crop_size", f"{crop}: too small for the PatchGAN discriminator")


def validate(cfg, num_devices=None):
  """Every rule above: known fields, values, the networks' constraints. Raises ConfigError at the first broken one.

  Args:
    cfg: a run config.
    num_devices: the job's device count (``data.global_batch_size`` must divide over it); None skips that rule.
  """
  check_known_fields(cfg)
  check_values(cfg, num_devices)
  check_networks(cfg)
