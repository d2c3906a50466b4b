"""The method table: for each training method, the networks it trains, its objective and its test-time forward.

Everything that differs between CMEDL and its baselines, or between the translators, is written here and only
here: the networks of a run (:func:`network_inputs`), the loss the train step differentiates (``Method.loss``),
which networks' variables evaluation restores and how they segment a CT at test time (``Method.predict``).
Adding a method is one :func:`register` call with its loss and test-time forward (docs/design.md, "Methods").

Gradient routing (docs/design.md, "Gradient routing") is set where the losses below stop or scale gradients:

- the generators get adversarial + cycle + identity (CycleGAN) or adversarial + PatchNCE (CUT) terms, and
  ``lambda_seg`` times the teacher's segmentation loss on pMRI = G_ct2mr(CT) (``scale_gradient``);
- the teacher gets its segmentation loss on pMRI (full weight);
- the student gets its segmentation loss on CT plus ``lambda_hint`` times the hint loss against
  stop_gradient(teacher features): the hint changes neither teacher nor generator;
- the discriminators get the LSGAN loss on real images vs pooled stop-gradient fakes; in the generators'
  adversarial terms the discriminator parameters are stop-gradient, so those terms train only the generators.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from cmedl_jax.train import image_pool, losses
from cmedl_jax.train import networks as networks_lib
from cmedl_jax.train.state import AXIS


@dataclasses.dataclass(frozen=True)
class StepInputs:
  """What a loss function reads: the run's networks and config, the variables, one device's batch, the keys.

  Attributes:
    nets: the run's :class:`~cmedl_jax.train.networks.Networks`.
    cfg: the run's config (``cfg.loss`` holds the weights).
    params, batch_stats, pools: the state's {name: ...} trees.
    batch: {"ct": (B, H, W, 1), "ct_label": (B, H, W) int, "mri": (B, H, W, 1)}, this device's rows.
    keys: {"dropout", "pool_mr", "pool_ct", "nce", "nce_identity"}: the step's PRNG keys.
  """

  nets: networks_lib.Networks
  cfg: Any
  params: Mapping[str, Any]
  batch_stats: Mapping[str, Any]
  pools: Mapping[str, Any]
  batch: Mapping[str, jax.Array]
  keys: Mapping[str, jax.Array]


class Objective:
  """The loss being summed, with what the step returns besides it: metrics, new statistics and pools, images."""

  def __init__(self, inputs: StepInputs):
    self.total = jnp.zeros((), jnp.float32)
    self.metrics = {}
    self.batch_stats = dict(inputs.batch_stats)
    self.pools = dict(inputs.pools)
    self.images = {}

  def add(self, name, value, weight=1.0):
    """Adds ``weight * value`` to the total and logs ``value`` as metric ``name``."""
    self.metrics[name] = value
    self.total = self.total + weight * value


@dataclasses.dataclass(frozen=True)
class Translator:
  """An unpaired CT -> MRI translator.

  Attributes:
    name: the ``config.translator`` value.
    networks: the networks it trains.
    loss: ``loss(inputs, objective) -> pmri``: adds the generator and discriminator terms, returns G(CT).
  """

  name: str
  networks: tuple[str, ...]
  loss: Callable[[StepInputs, Objective], jax.Array]


@dataclasses.dataclass(frozen=True)
class Method:
  """A training method.

  Attributes:
    name: the ``config.method`` value.
    label: its name in reports and tables.
    segmenters: {segmenter network: input channels} it trains.
    uses_translator: whether it trains the ``config.translator`` networks too.
    loss: ``loss(inputs, objective)``: adds every term of the objective.
    test_time_networks: the networks whose variables are saved for, and restored by, evaluation.
    predict: ``predict(nets, variables, ct) -> logits``: (B, H, W, 1) normalised CT to (B, H, W, classes), with
      ``variables = {"params": {name: ...}, "batch_stats": {name: ...}}`` of ``test_time_networks``.
    description: one line for ``--help`` texts and docs.
  """

  name: str
  label: str
  segmenters: Mapping[str, int]
  uses_translator: bool
  loss: Callable[[StepInputs, Objective], None]
  test_time_networks: tuple[str, ...]
  predict: Callable[[networks_lib.Networks, Mapping[str, Any], jax.Array], jax.Array]
  description: str = ""


METHODS: dict[str, Method] = {}
TRANSLATORS: dict[str, Translator] = {}


def register(entry):
  """Adds a :class:`Method` or :class:`Translator` to its table (replacing one of the same name); returns it."""
  table = METHODS if isinstance(entry, Method) else TRANSLATORS
  table[entry.name] = entry
  return entry


def get(name) -> Method:
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
  return METHODS[name]


def get_translator(name) -> Translator:
  if name not in TRANSLATORS:
    raise ValueError(f"unknown translator {name!r}; expected one of {', '.join(TRANSLATORS)}")
  return TRANSLATORS[name]


def network_inputs(cfg) -> dict[str, int]:
  """{network name: input channels} of the run of ``cfg`` (its method's segmenters, its translator's networks)."""
  method = get(cfg.method)
  names = dict(method.segmenters)
  if method.uses_translator:
    names.update({name: 1 for name in get_translator(cfg.translator).networks})
  return names


def test_time_variables(cfg, params, batch_stats):
  """{"params": ..., "batch_stats": ...} of the test-time networks of ``cfg``'s method, from the state's trees."""
  names = get(cfg.method).test_time_networks
  return {"params": {n: params[n] for n in names},
          "batch_stats": {n: batch_stats[n] for n in names if n in batch_stats}}


def build_networks(cfg, bn_axis_name="data") -> networks_lib.Networks:
  """The flax modules of the run of ``cfg``."""
  return networks_lib.build_modules(cfg.model, network_inputs(cfg), bn_axis_name=bn_axis_name,
                                    compute_dtype=cfg.compute_dtype)


def compute_losses(params, batch_stats, pools, batch, key, *, nets, cfg):
  """The run's objective on one device's batch (inside the data-parallel step; collectives over ``"data"``).

  Returns:
    (total loss, (metrics, new batch_stats, new pools, images for previews)).
  """
  k_pool_mr, k_pool_ct, k_nce, k_nce_idt, k_drop = jax.random.split(key, 5)
  inputs = StepInputs(nets, cfg, params, batch_stats, pools, batch,
                      keys=dict(pool_mr=k_pool_mr, pool_ct=k_pool_ct, nce=k_nce, nce_identity=k_nce_idt,
                                dropout=k_drop))
  objective = Objective(inputs)
  get(cfg.method).loss(inputs, objective)
  objective.metrics["total"] = objective.total
  return objective.total, (objective.metrics, objective.batch_stats, objective.pools, objective.images)


# ================================================================================ shared terms


def _local_slice(global_array, local_batch):
  """This device's rows of an all-gathered (global) batch."""
  start = jax.lax.axis_index(AXIS) * local_batch
  return jax.lax.dynamic_slice_in_dim(global_array, start, local_batch, axis=0)


def discriminator_term(inputs, objective, name, real, fake, key):
  """LSGAN loss of discriminator ``name`` on ``real`` vs pooled stop-gradient ``fake`` images.

  The pool is global: the fakes of all devices are gathered, queried with a key shared by all devices and this
  device's rows taken back, so the numbers do not depend on the device count.
  """
  nets, params = inputs.nets, inputs.params
  pool = networks_lib.ROLES[name].pool
  pooled, objective.pools[pool] = image_pool.query_pool(
      inputs.pools[pool], jax.lax.all_gather(jax.lax.stop_gradient(fake), AXIS, tiled=True), key)
  loss = losses.lsgan_discriminator_loss(nets.discriminate(name, params[name], real),
                                         nets.discriminate(name, params[name], _local_slice(pooled, real.shape[0])))
  objective.add(f"d_{pool}", loss)


def adversarial_term(inputs, name, fake):
  """The generators' LSGAN loss through discriminator ``name``, whose parameters it does not train."""
  frozen = jax.lax.stop_gradient(inputs.params[name])
  return losses.lsgan_generator_loss(inputs.nets.discriminate(name, frozen, fake))


def segmentation_term(inputs, objective, name, x, metric):
  """Segmenter ``name`` on ``x`` against the CT label: adds its loss as ``metric``, returns its decoder features."""
  logits, features, objective.batch_stats[name] = inputs.nets.segment(
      name, inputs.params[name], inputs.batch_stats[name], x)
  lc = inputs.cfg.loss
  objective.add(metric, losses.segmentation_loss(logits, inputs.batch["ct_label"], dice_weight=lc.dice_weight,
                                                 dice_smooth=lc.dice_smooth))
  objective.images[f"{name}_logits"] = logits
  return features


def translation_term(inputs, objective):
  """The config's translator's terms; returns pMRI = G_ct2mr(CT) (also kept for the previews)."""
  pmri = get_translator(inputs.cfg.translator).loss(inputs, objective)
  objective.images["pmri"] = pmri
  return pmri


def teacher_term(inputs, objective, pmri):
  """The teacher on pMRI: full gradient to the teacher, ``lambda_seg`` of it to the generator."""
  return segmentation_term(inputs, objective, "teacher", losses.scale_gradient(pmri, inputs.cfg.loss.lambda_seg),
                           "teacher_seg")


def _student_on_ct(nets, variables, ct):
  return nets.segment("student", variables["params"]["student"], variables["batch_stats"]["student"], ct,
                      train=False)[0]


# ================================================================================ translators


def _cyclegan_loss(inputs, objective):
  """G: CT -> MRI and F: MRI -> CT, adversarial + cycle (+ identity) terms, two discriminators."""
  nets, params, lc = inputs.nets, inputs.params, inputs.cfg.loss
  ct, mri, k_drop = inputs.batch["ct"], inputs.batch["mri"], inputs.keys["dropout"]
  g, f = params["gen_ct2mr"], params["gen_mr2ct"]
  pmri = nets.generate("gen_ct2mr", g, ct, k_drop)
  pct = nets.generate("gen_mr2ct", f, mri, jax.random.fold_in(k_drop, 1))
  rec_ct = nets.generate("gen_mr2ct", f, pmri, jax.random.fold_in(k_drop, 2))
  rec_mr = nets.generate("gen_ct2mr", g, pct, jax.random.fold_in(k_drop, 3))
  objective.images.update(pct=pct, rec_ct=rec_ct)
  adv_g, adv_f = adversarial_term(inputs, "disc_mr", pmri), adversarial_term(inputs, "disc_ct", pct)
  cycle = losses.l1(rec_ct, ct) + losses.l1(rec_mr, mri)
  gen_loss = adv_g + adv_f + lc.lambda_cycle * cycle
  objective.metrics.update(g_adv_ct2mr=adv_g, g_adv_mr2ct=adv_f, cycle=cycle)
  if lc.lambda_identity > 0:
    idt = (losses.l1(nets.generate("gen_ct2mr", g, mri, jax.random.fold_in(k_drop, 4)), mri)
           + losses.l1(nets.generate("gen_mr2ct", f, ct, jax.random.fold_in(k_drop, 5)), ct))
    gen_loss = gen_loss + lc.lambda_cycle * lc.lambda_identity * idt
    objective.metrics["identity"] = idt
  objective.add("gen_total", gen_loss)
  discriminator_term(inputs, objective, "disc_mr", mri, pmri, inputs.keys["pool_mr"])
  discriminator_term(inputs, objective, "disc_ct", ct, pct, inputs.keys["pool_ct"])
  return pmri


def _cut_loss(inputs, objective):
  """G: CT -> MRI, adversarial + PatchNCE between the CT and its translation (+ identity NCE on MRI)."""
  nets, params, lc = inputs.nets, inputs.params, inputs.cfg.loss
  ct, mri, k_drop = inputs.batch["ct"], inputs.batch["mri"], inputs.keys["dropout"]
  g = params["gen_ct2mr"]
  pmri = nets.generate("gen_ct2mr", g, ct, k_drop)
  adv = adversarial_term(inputs, "disc_mr", pmri)
  nce = nets.patch_nce(g, params["nce_head"], ct, pmri, inputs.keys["nce"])
  objective.metrics.update(g_adv_ct2mr=adv, nce=nce)
  if lc.nce_identity:
    idt_mr = nets.generate("gen_ct2mr", g, mri, jax.random.fold_in(k_drop, 4))
    nce_idt = nets.patch_nce(g, params["nce_head"], mri, idt_mr, inputs.keys["nce_identity"])
    objective.metrics["nce_identity"] = nce_idt
    nce = 0.5 * (nce + nce_idt)
  objective.add("gen_total", adv + lc.lambda_nce * nce)
  discriminator_term(inputs, objective, "disc_mr", mri, pmri, inputs.keys["pool_mr"])
  return pmri


register(Translator("cyclegan", ("gen_ct2mr", "gen_mr2ct", "disc_mr", "disc_ct"), _cyclegan_loss))
register(Translator("cut", ("gen_ct2mr", "disc_mr", "nce_head"), _cut_loss))


# ================================================================================ methods


def _cmedl_loss(inputs, objective):
  """Translator + teacher on pMRI + student on CT pulled towards stop_gradient(teacher features)."""
  pmri = translation_term(inputs, objective)
  teacher_features = teacher_term(inputs, objective, pmri)
  student_features = segmentation_term(inputs, objective, "student", inputs.batch["ct"], "student_seg")
  lambda_hint = inputs.cfg.loss.lambda_hint
  if lambda_hint > 0:
    names = inputs.nets.hint_names(inputs.cfg.model.hint_features)
    objective.add("hint", losses.hint_loss([student_features[n] for n in names],
                                           [teacher_features[n] for n in names]),
                  lambda_hint)


def _ct_only_loss(inputs, objective):
  segmentation_term(inputs, objective, "student", inputs.batch["ct"], "student_seg")


def _pmri_only_loss(inputs, objective):
  teacher_term(inputs, objective, translation_term(inputs, objective))


def _pmri_only_predict(nets, variables, ct):
  params, stats = variables["params"], variables["batch_stats"]
  pmri = nets.generate("gen_ct2mr", params["gen_ct2mr"], ct, train=False)
  return nets.segment("teacher", params["teacher"], stats["teacher"], pmri, train=False)[0]


def _concat_loss(inputs, objective):
  # The concat student's pMRI channel is an input, not a path into the generator.
  pmri = jax.lax.stop_gradient(translation_term(inputs, objective))
  segmentation_term(inputs, objective, "student", jnp.concatenate([inputs.batch["ct"], pmri], axis=-1),
                    "student_seg")


def _concat_predict(nets, variables, ct):
  params, stats = variables["params"], variables["batch_stats"]
  pmri = nets.generate("gen_ct2mr", params["gen_ct2mr"], ct, train=False)
  return nets.segment("student", params["student"], stats["student"], jnp.concatenate([ct, pmri], axis=-1),
                      train=False)[0]


register(Method("cmedl", "CMEDL", {"teacher": 1, "student": 1}, True, _cmedl_loss, ("student",), _student_on_ct,
                "translator + teacher on pseudo MRI + student on CT distilled from the teacher; student at test"))
register(Method("ct_only", "CT only", {"student": 1}, False, _ct_only_loss, ("student",), _student_on_ct,
                "the student alone on CT"))
register(Method("pmri_only", "pMRI only", {"teacher": 1}, True, _pmri_only_loss, ("gen_ct2mr", "teacher"),
                _pmri_only_predict, "translator + teacher on pseudo MRI; at test time teacher(G(CT))"))
register(Method("ct_pmri_concat", "CT+pMRI", {"student": 2}, True, _concat_loss, ("gen_ct2mr", "student"),
                _concat_predict, "translator + a student on the two-channel [CT, G(CT)] input"))
