"""The networks of a run: the catalogue of network roles, and the flax modules of one run with their calls.

Which networks a run has comes from its method and translator (:mod:`cmedl_jax.train.methods`); this module only
knows what each network *is*: its kind (how it is built, initialised and called), its optimizer group and, for a
discriminator, the image pool of fakes it is trained on.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from cmedl_jax.models import build, patchnce
from cmedl_jax.models.resnet_generator import CUT_NCE_LAYERS


@dataclasses.dataclass(frozen=True)
class Role:
  """What a network is.

  Attributes:
    kind: "generator" (ResNet generator), "discriminator" (PatchGAN), "patch_sampler" (CUT's PatchNCE head, on
      the features of ``gen_ct2mr``) or "segmenter" (``model.segmenter``; returns (logits, decoder features)).
    group: the optimizer group that updates it ("gen", "disc" or "seg"; ``config.optim[group]``).
    pool: for a discriminator, the name of its pool of generated images (the CycleGAN history buffer).
    from_torch: ``cmedl-convert-torch`` converts this network, so ``config.init_from`` can start it.
  """

  kind: str
  group: str
  pool: Optional[str] = None
  from_torch: bool = True


# Every network a method can use, in the order their init keys are split (adding one changes every run's init).
ROLES: Mapping[str, Role] = {
    "gen_ct2mr": Role("generator", "gen"),          # G: CT -> pseudo MRI
    "gen_mr2ct": Role("generator", "gen"),          # F: MRI -> pseudo CT (CycleGAN)
    "disc_mr": Role("discriminator", "disc", pool="mr"),
    "disc_ct": Role("discriminator", "disc", pool="ct"),
    "nce_head": Role("patch_sampler", "gen", from_torch=False),
    "teacher": Role("segmenter", "seg"),            # segments pseudo MRI
    "student": Role("segmenter", "seg"),            # segments CT; the test-time network of CMEDL
}
GROUPS = ("gen", "disc", "seg")
COMPUTE_DTYPES = ("float32", "bfloat16")  # config.compute_dtype


@dataclasses.dataclass(frozen=True)
class Networks:
  """The flax modules of one run and the calls the losses and the test-time forward make.

  Attributes:
    modules: {network name: flax module}, in :data:`ROLES` order, only the networks of the run.
    in_channels: {network name: input channels} (2 for a segmenter on [CT, pseudo MRI]).
    nce_layers, num_patches, nce_temperature: CUT's PatchNCE settings (``model.nce``).
    compute_dtype: the dtype of activations and convolutions (``config.compute_dtype``). Every call below casts
      its input to it and its outputs (images, logits, features) back to float32; parameters, BatchNorm
      statistics and everything the losses reduce stay float32 (docs/design.md, "Mixed precision").
  """

  modules: Mapping[str, Any]
  in_channels: Mapping[str, int]
  nce_layers: tuple = CUT_NCE_LAYERS
  num_patches: int = patchnce.NUM_PATCHES
  nce_temperature: float = patchnce.NCE_TEMPERATURE
  compute_dtype: Any = jnp.float32

  def _in(self, x):
    return x.astype(self.compute_dtype)

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(self.modules)

  def __contains__(self, name) -> bool:
    return name in self.modules

  def __getitem__(self, name):
    return self.modules[name]

  # -------------------------------------------------------------- calls made by the losses and at test time

  def generate(self, name, params, x, key=None, train=True):
    """(N, H, W, 1) images -> the generator's (N, H, W, 1) translation; ``key`` drives dropout."""
    rngs = {"dropout": key} if key is not None else {}
    return _float32(self.modules[name].apply({"params": params}, self._in(x), train=train, rngs=rngs))

  def discriminate(self, name, params, x):
    """(N, H, W, 1) images -> PatchGAN logits."""
    return _float32(self.modules[name].apply({"params": params}, self._in(x), train=True))

  def segment(self, name, params, batch_stats, x, train=True):
    """(N, H, W, C) images -> (logits (N, H, W, classes), {name: decoder feature map}, new batch_stats)."""
    module = self.modules[name]
    if train:
      (logits, features), updates = module.apply({"params": params, "batch_stats": batch_stats}, self._in(x),
                                                 train=True, mutable=["batch_stats"])
      return _float32(logits), _float32(features), updates["batch_stats"]
    logits, features = module.apply({"params": params, "batch_stats": batch_stats}, self._in(x), train=False)
    return _float32(logits), _float32(features), batch_stats

  def hint_names(self, configured=()):
    """The distillation feature names: ``configured`` if given, else the segmenter's last two decoder maps."""
    segmenter = next(m for n, m in self.modules.items() if ROLES[n].kind == "segmenter")
    return tuple(configured) if configured else tuple(segmenter.hint_feature_names())

  def patch_nce(self, g_params, head_params, source, translated, key):
    """CUT's NCE loss between ``source`` and its translation (same patch locations for both)."""
    generator = self.modules["gen_ct2mr"]
    feats_k, feats_q = (_float32(generator.apply({"params": g_params}, self._in(x), nce_layers=self.nce_layers,
                                                 encode_only=True)) for x in (source, translated))
    patch_ids = patchnce.sample_patch_ids(key, [f.shape for f in feats_k], self.num_patches)
    proj_k = self.modules["nce_head"].apply({"params": head_params}, feats_k, patch_ids)
    proj_q = self.modules["nce_head"].apply({"params": head_params}, feats_q, patch_ids)
    return patchnce.multilayer_patch_nce_loss(proj_q, proj_k, source.shape[0], self.nce_temperature)


def _float32(tree):
  return jax.tree.map(lambda a: a.astype(jnp.float32), tree)


def build_modules(model_cfg, in_channels: Mapping[str, int], bn_axis_name: Optional[str] = "data",
                  compute_dtype="float32") -> Networks:
  """The modules of the networks named in ``in_channels`` ({name: input channels}) from ``config.model``, computing
  in ``compute_dtype`` ("float32" | "bfloat16").

  Use :func:`cmedl_jax.train.methods.build_networks` for a run's config: it knows which networks the run has.
  """
  unknown = sorted(set(in_channels) - set(ROLES))
  if unknown:
    raise ValueError(f"unknown networks {unknown}; known: {list(ROLES)}")
  m = model_cfg
  make = {
      "generator": lambda: build.build_generator(**m.generator),
      "discriminator": lambda: build.build_discriminator(**m.discriminator),
      "patch_sampler": lambda: build.build_patch_sampler(features=m.nce.mlp_features),
      "segmenter": lambda: build.build_segmenter(m.segmenter, num_classes=m.num_classes, bn_axis_name=bn_axis_name,
                                                 **dict(m.segmenter_kwargs)),
  }
  ordered = [name for name in ROLES if name in in_channels]
  return Networks(modules={name: make[ROLES[name].kind]() for name in ordered},
                  in_channels={name: int(in_channels[name]) for name in ordered},
                  nce_layers=tuple(m.nce.layers), num_patches=int(m.nce.num_patches),
                  nce_temperature=float(m.nce.temperature), compute_dtype=jnp.dtype(compute_dtype))


def init_variables(nets: Networks, key, image_shape):
  """Initial {name: params} and {segmenter name: batch_stats} for an (H, W, 1) image shape.

  Meant to run under ``jax.jit`` (eager linen init is slow on CPU).
  """
  h, w, _ = image_shape
  params, stats = {}, {}
  keys = dict(zip(ROLES, jax.random.split(key, len(ROLES))))
  for name, module in nets.modules.items():
    k = keys[name]
    x = jnp.zeros((1, h, w, nets.in_channels[name]), jnp.float32)
    kind = ROLES[name].kind
    if kind == "generator":
      params[name] = module.init({"params": k, "dropout": k}, x)["params"]
    elif kind == "discriminator":
      params[name] = module.init(k, x)["params"]
    elif kind == "patch_sampler":  # sized by the generator's features (gen_ct2mr comes first in ROLES)
      feats = nets["gen_ct2mr"].apply({"params": params["gen_ct2mr"]}, x, nce_layers=nets.nce_layers,
                                      encode_only=True)
      ids = patchnce.sample_patch_ids(k, [f.shape for f in feats], nets.num_patches)
      params[name] = module.init(k, feats, ids)["params"]
    else:
      variables = module.init(k, x, train=False)
      params[name] = variables["params"]
      stats[name] = variables.get("batch_stats", {})
  return params, stats


def abstract_variables(nets: Networks, name, image_shape):
  """The flax variables of network ``name`` for (1, H, W, its input channels) inputs, as ShapeDtypeStructs."""
  h, w, _ = image_shape
  kwargs = {"train": False} if ROLES[name].kind == "segmenter" else {}
  return build.abstract_variables(nets[name], (1, h, w, nets.in_channels[name]), **kwargs)
