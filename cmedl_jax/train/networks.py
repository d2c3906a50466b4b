"""The set of networks of one CMEDL run, built from the config, with the calls the train step makes."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from cmedl_jax.models import build, patchnce


@dataclasses.dataclass(frozen=True)
class Networks:
  """Flax modules of a run (None where the method does not use one) and their call conventions.

  Attributes:
    gen_ct2mr, gen_mr2ct: ResNet generators (G and F); F only for CycleGAN.
    disc_mr, disc_ct: PatchGANs on MRI and CT; disc_ct only for CycleGAN.
    nce_head: CUT's PatchNCE MLP head (CUT only).
    teacher, student: segmenters (``(logits, decoder features)``).
    nce_layers, num_patches, nce_temperature: CUT settings.
    bn_axis_name: the data axis that BatchNorm averages over.
  """

  gen_ct2mr: Any = None
  gen_mr2ct: Any = None
  disc_mr: Any = None
  disc_ct: Any = None
  nce_head: Any = None
  teacher: Any = None
  student: Any = None
  student_in_channels: int = 1
  nce_layers: tuple = (0, 4, 8, 12, 16)
  num_patches: int = patchnce.NUM_PATCHES
  nce_temperature: float = patchnce.NCE_TEMPERATURE

  # -------------------------------------------------------------- calls made by the train step

  def generate(self, module, params, x, key):
    return module.apply({"params": params}, x, train=True, rngs={"dropout": key})

  def discriminate(self, module, params, x):
    return module.apply({"params": params}, x, train=True)

  def segment(self, module, params, batch_stats, x, train=True):
    """Returns (logits, {name: decoder feature map}, new batch_stats)."""
    if train:
      (logits, features), updates = module.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                                 mutable=["batch_stats"])
      return logits, features, updates["batch_stats"]
    logits, features = module.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
    return logits, features, batch_stats

  def hint_names(self, configured=()):
    """The distillation feature names: ``configured`` if given, else the segmenter's last two decoder maps."""
    module = self.student if self.student is not None else self.teacher
    return tuple(configured) if configured else tuple(module.hint_feature_names())

  def patch_nce(self, g_params, head_params, source, translated, key):
    """CUT's NCE loss between ``source`` and its translation (same patch locations for both)."""
    feats_k = self.gen_ct2mr.apply({"params": g_params}, source, nce_layers=self.nce_layers, encode_only=True)
    feats_q = self.gen_ct2mr.apply({"params": g_params}, translated, nce_layers=self.nce_layers,
                                   encode_only=True)
    patch_ids = patchnce.sample_patch_ids(key, [f.shape for f in feats_k], self.num_patches)
    proj_k = self.nce_head.apply({"params": head_params}, feats_k, patch_ids)
    proj_q = self.nce_head.apply({"params": head_params}, feats_q, patch_ids)
    return patchnce.multilayer_patch_nce_loss(proj_q, proj_k, source.shape[0], self.nce_temperature)


def build_networks(cfg, bn_axis_name: Optional[str] = "data") -> Networks:
  """Instantiates the networks ``cfg.method`` / ``cfg.translator`` need."""
  m = cfg.model
  uses_translator = cfg.method != "ct_only"
  cyclegan = uses_translator and cfg.translator == "cyclegan"
  cut = uses_translator and cfg.translator == "cut"
  if uses_translator and cfg.translator not in ("cyclegan", "cut"):
    raise ValueError(f"unknown translator {cfg.translator!r}; expected 'cyclegan' or 'cut'")
  if cfg.method not in ("cmedl", "ct_only", "pmri_only", "ct_pmri_concat"):
    raise ValueError(f"unknown method {cfg.method!r}; expected cmedl, ct_only, pmri_only or ct_pmri_concat")
  gen = lambda: build.build_generator(**m.generator)  # noqa: E731
  disc = lambda: build.build_discriminator(**m.discriminator)  # noqa: E731
  seg = lambda: build.build_segmenter(m.segmenter, num_classes=m.num_classes,  # noqa: E731
                                      bn_axis_name=bn_axis_name, **dict(m.segmenter_kwargs))
  return Networks(
      gen_ct2mr=gen() if uses_translator else None,
      gen_mr2ct=gen() if cyclegan else None,
      disc_mr=disc() if uses_translator else None,
      disc_ct=disc() if cyclegan else None,
      nce_head=build.build_patch_sampler(features=m.nce.mlp_features) if cut else None,
      teacher=seg() if cfg.method in ("cmedl", "pmri_only") else None,
      student=seg() if cfg.method != "pmri_only" else None,
      student_in_channels=2 if cfg.method == "ct_pmri_concat" else 1,
      nce_layers=tuple(m.nce.layers), num_patches=int(m.nce.num_patches), nce_temperature=float(m.nce.temperature))


def init_variables(nets: Networks, key, image_shape):
  """Initial {name: params} and {segmenter name: batch_stats} for an (H, W, 1) image shape.

  Meant to run under ``jax.jit`` (eager linen init is slow on CPU).
  """
  h, w, _ = image_shape
  x1 = jnp.zeros((1, h, w, 1), jnp.float32)
  params, stats = {}, {}
  keys = dict(zip(["gen_ct2mr", "gen_mr2ct", "disc_mr", "disc_ct", "nce_head", "teacher", "student"],
                  jax.random.split(key, 7)))
  for name in ("gen_ct2mr", "gen_mr2ct"):
    module = getattr(nets, name)
    if module is not None:
      params[name] = module.init({"params": keys[name], "dropout": keys[name]}, x1)["params"]
  for name in ("disc_mr", "disc_ct"):
    module = getattr(nets, name)
    if module is not None:
      params[name] = module.init(keys[name], x1)["params"]
  if nets.nce_head is not None:
    feats = nets.gen_ct2mr.apply({"params": params["gen_ct2mr"]}, x1, nce_layers=nets.nce_layers,
                                 encode_only=True)
    ids = patchnce.sample_patch_ids(keys["nce_head"], [f.shape for f in feats], nets.num_patches)
    params["nce_head"] = nets.nce_head.init(keys["nce_head"], feats, ids)["params"]
  for name, channels in (("teacher", 1), ("student", nets.student_in_channels)):
    module = getattr(nets, name)
    if module is None:
      continue
    x = jnp.zeros((1, h, w, channels), jnp.float32)
    variables = module.init(keys[name], x, train=False)
    params[name] = variables["params"]
    stats[name] = variables.get("batch_stats", {})
  return params, stats

