"""One CMEDL train step (CycleGAN translator) in PyTorch eager: the reference for :mod:`cmedl_jax.train.step`.

The same objective and gradient routing as ``cmedl_jax.train.methods.compute_losses`` for ``method="cmedl"``, ``translator="cyclegan"``,
from ONE scalar and one ``backward()``:

- generators: LSGAN adversarial terms with the discriminators' parameters detached
  (``NLayerDiscriminator(x, detach_params=True)``), cycle L1 x ``lambda_cycle``, identity L1 x ``lambda_cycle *
  lambda_identity``, and ``lambda_seg`` x the teacher's loss through pMRI (:func:`scale_gradient`);
- teacher: CE + soft Dice on pMRI = G(CT) (train-mode BatchNorm);
- student: CE + soft Dice on CT + ``lambda_hint`` x hint (MSE to the detached teacher features, per layer, summed);
- discriminators: LSGAN on real vs pooled detached fakes (CycleGAN's ``ImagePool``).

Then one optimizer per group (gen, disc, seg) steps, like the optax optimizers of the JAX step (Adam / AdamW /
SGD, optional global-norm clipping per group, constant-then-linear-decay learning rate).

The pools draw from a ``torch.Generator`` and the JAX pools from JAX's PRNG, so the two agree only while the pools
are filling (they then return the new fakes); generator dropout also differs. Parity tests therefore use
``pool_size >= images seen`` and no dropout.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmedl_jax.torch_port import convert, reference

GROUPS = {"gen": ("gen_ct2mr", "gen_mr2ct"), "disc": ("disc_mr", "disc_ct"), "seg": ("teacher", "student")}
NETWORK_NAMES = tuple(name for names in GROUPS.values() for name in names)


# ------------------------------------------------------------------------------------------------ loss terms
def lsgan_generator_loss(fake_scores):
  return torch.mean((fake_scores - 1.0) ** 2)


def lsgan_discriminator_loss(real_scores, fake_scores):
  return 0.5 * (torch.mean((real_scores - 1.0) ** 2) + torch.mean(fake_scores ** 2))


def l1(a, b):
  return torch.mean(torch.abs(a - b))


def soft_dice_loss(logits, labels, smooth=1.0):
  """1 - mean over samples and foreground classes of the per-sample soft Dice; logits (N, K, H, W), labels (N, H, W)."""
  probs = torch.softmax(logits, dim=1)[:, 1:]
  onehot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)[:, 1:]
  intersection = torch.sum(probs * onehot, dim=(2, 3))
  denominator = torch.sum(probs, dim=(2, 3)) + torch.sum(onehot, dim=(2, 3))
  return 1.0 - torch.mean((2.0 * intersection + smooth) / (denominator + smooth))


def segmentation_loss(logits, labels, dice_weight=1.0, dice_smooth=1.0):
  """Mean pixel-wise softmax CE + ``dice_weight`` x soft Dice."""
  return F.cross_entropy(logits, labels) + dice_weight * soft_dice_loss(logits, labels, dice_smooth)


def hint_loss(student_features, teacher_features):
  """Sum over layers of the MSE between student features and the detached teacher features."""
  return sum(torch.mean((s - t.detach()) ** 2) for s, t in zip(student_features, teacher_features))


def scale_gradient(x, scale):
  """Identity forward; the gradient flowing back through ``x`` is multiplied by ``scale``."""
  return x.detach() + scale * (x - x.detach())


class ImagePool:
  """CycleGAN's ``util/image_pool.ImagePool`` (``random`` replaced by a seeded ``torch.Generator``)."""

  def __init__(self, size: int, seed: int = 0):
    self.size = int(size)
    self.images = []
    self._generator = torch.Generator().manual_seed(seed)

  # Python-side state (a growing list): under torch.compile it would be guarded on and recompiled at every size.
  @torch.compiler.disable
  def query(self, images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) new fakes -> (N, C, H, W) images for the discriminator (detached)."""
    images = images.detach()
    if self.size == 0:
      return images
    out = []
    for image in images:
      image = image.unsqueeze(0)
      if len(self.images) < self.size:
        self.images.append(image)
        out.append(image)
      elif torch.rand((), generator=self._generator) > 0.5:
        index = int(torch.randint(0, self.size, (), generator=self._generator))
        out.append(self.images[index].clone())
        self.images[index] = image
      else:
        out.append(image)
    return torch.cat(out, 0)


# ------------------------------------------------------------------------------------------------ optimizers
def constant_then_linear_decay(total_steps: int, decay_start_fraction: float = 0.5):
  """The learning-rate factor of ``cmedl_jax.train.optim.constant_then_linear_decay`` (for ``LambdaLR``)."""
  total_steps = max(int(total_steps), 1)
  constant = int(round(total_steps * float(decay_start_fraction)))
  decay = max(total_steps - constant, 1)
  return lambda t: 1.0 if t < constant else 1.0 - min(t - constant, decay) / decay


@dataclasses.dataclass
class GroupOptimizer:
  """A torch optimizer over one parameter group, with the schedule and clipping of the optax chain."""

  optimizer: torch.optim.Optimizer
  scheduler: Any
  params: list
  grad_clip: float = 0.0

  @classmethod
  def from_config(cls, params, cfg, total_steps):
    """``cfg``: the group's ``optim`` entry (name, lr, b1, b2, weight_decay, grad_clip, decay_start_fraction)."""
    params = list(params)
    name = cfg.get("name", "adam")
    if name == "sgd":
      opt = torch.optim.SGD(params, lr=cfg.lr)
    elif name != "adam":
      raise ValueError(f"unknown optimizer {name!r}; expected 'adam' or 'sgd'")
    elif cfg.get("weight_decay", 0.0):
      opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.b1, cfg.b2), weight_decay=cfg.weight_decay)
    else:
      opt = torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.b1, cfg.b2))
    schedule = constant_then_linear_decay(total_steps, cfg.get("decay_start_fraction", 0.5))
    return cls(opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule), params, float(cfg.get("grad_clip", 0.0)))

  def grad_norm(self) -> torch.Tensor:
    grads = [p.grad for p in self.params if p.grad is not None]
    return torch.sqrt(sum(torch.sum(g ** 2) for g in grads)) if grads else torch.zeros(())

  def step(self):
    if self.grad_clip:
      torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
    self.optimizer.step()
    self.scheduler.step()


# ------------------------------------------------------------------------------------------------ the step
@dataclasses.dataclass(frozen=True)
class LossWeights:
  """The ``loss`` fields of the config that the CycleGAN CMEDL step uses."""

  lambda_cycle: float = 10.0
  lambda_identity: float = 0.5
  lambda_seg: float = 1.0
  lambda_hint: float = 1.0
  dice_weight: float = 1.0
  dice_smooth: float = 1.0


class CMEDLStep:
  """The CMEDL networks, pools and optimizers in PyTorch, with :meth:`step` = one training step.

  Args:
    networks: {"gen_ct2mr", "gen_mr2ct": ``reference.ResnetGenerator``; "disc_mr", "disc_ct":
      ``reference.NLayerDiscriminator``; "teacher", "student": ``reference.UNet`` / ``FCDenseNet``}.
    weights: loss weights.
    hint_features: names of the distilled decoder maps (default: the student's last two).
    pool_size: image pool size per discriminator.
    optimizers: {group: GroupOptimizer} (``from_config`` builds them); needed by :meth:`step` only.
    seed: seed of the pools' generator.
  """

  def __init__(self, networks: Mapping[str, nn.Module], weights: LossWeights = LossWeights(), *,
               hint_features: Sequence[str] = (), pool_size: int = 50,
               optimizers: Optional[Mapping[str, GroupOptimizer]] = None, seed: int = 0):
    missing = sorted(set(NETWORK_NAMES) - set(networks))
    if missing:
      raise ValueError(f"networks lack {missing}")
    self.networks = dict(networks)
    self.weights = weights
    self.hint_features = tuple(hint_features) or tuple(self.networks["student"].hint_feature_names())
    self.pools = {"mr": ImagePool(pool_size, seed), "ct": ImagePool(pool_size, seed + 1)}
    self.optimizers = dict(optimizers or {})
    self._losses = self.compute_losses
    self.device = torch.device("cpu")
    self.amp_dtype = None
    for net in self.networks.values():
      net.train()

  @classmethod
  def from_config(cls, cfg, seed: int = 0) -> "CMEDLStep":
    """Networks (seeded init: CycleGAN's N(0, 0.02) for G and D, PyTorch defaults for the segmenters), pools and
    optimizers of a ``method="cmedl"``, ``translator="cyclegan"`` config."""
    if cfg.method != "cmedl" or cfg.translator != "cyclegan":
      raise NotImplementedError(f"the PyTorch reference step covers cmedl + cyclegan, not {cfg.method} + "
                                f"{cfg.translator}")
    torch.manual_seed(seed)
    m = cfg.model
    gen_options = _options(m.generator, "generator", ignore=("init_type", "init_gain"))
    disc_options = _options(m.discriminator, "discriminator", ignore=("init_type", "init_gain"))
    seg_options = _options(m.segmenter_kwargs, m.segmenter, ignore=("bn_axis_name",),
                           rename={"dropout_rate": "drop_rate"})
    networks = {}
    for name in GROUPS["gen"]:
      networks[name] = reference.init_gan_weights(reference.build("generator", **gen_options),
                                                  m.generator.get("init_gain", 0.02))
    for name in GROUPS["disc"]:
      networks[name] = reference.init_gan_weights(reference.build("discriminator", **disc_options),
                                                  m.discriminator.get("init_gain", 0.02))
    for name in GROUPS["seg"]:
      networks[name] = reference.build(m.segmenter, num_classes=m.num_classes, **seg_options)
    optimizers = {
        group: GroupOptimizer.from_config([p for n in names for p in networks[n].parameters()], cfg.optim[group],
                                          cfg.train.total_steps)
        for group, names in GROUPS.items()}
    weights = LossWeights(**{f.name: float(cfg.loss[f.name]) for f in dataclasses.fields(LossWeights)})
    return cls(networks, weights, hint_features=tuple(m.hint_features), pool_size=cfg.pool_size,
               optimizers=optimizers, seed=seed)

  def to(self, device, amp_dtype=None) -> "CMEDLStep":
    """Moves the networks (and so the optimizers' parameters) to ``device``; with ``amp_dtype`` (e.g.
    ``torch.bfloat16``) :meth:`step` runs the loss computation under ``torch.autocast`` (PyTorch AMP: float32
    parameters, autocast's per-op dtypes)."""
    self.device = torch.device(device)
    for net in self.networks.values():
      net.to(self.device)
    self.amp_dtype = amp_dtype
    return self

  def compile(self, **kwargs) -> "CMEDLStep":
    """Runs the loss computation (forward; AOTAutograd compiles the backward) through ``torch.compile``."""
    self._losses = torch.compile(self.compute_losses, **kwargs)
    return self

  def compute_losses(self, ct, label, mri):
    """The CMEDL objective.

    Args:
      ct: (N, 1, H, W) float CT; label: (N, H, W) int64; mri: (N, 1, H, W) unpaired MRI.

    Returns:
      ``(total, metrics, images)``: the scalar to differentiate, {name: 0-d tensor} with the keys of the JAX
      step's metrics, and {"pmri", "pct", "teacher_logits", "student_logits"}.
    """
    w, nets = self.weights, self.networks
    g, f = nets["gen_ct2mr"], nets["gen_mr2ct"]
    d_mr, d_ct = nets["disc_mr"], nets["disc_ct"]
    metrics = {}
    pmri = g(ct)
    pct = f(mri)
    rec_ct, rec_mr = f(pmri), g(pct)
    metrics["g_adv_ct2mr"] = lsgan_generator_loss(d_mr(pmri, detach_params=True))
    metrics["g_adv_mr2ct"] = lsgan_generator_loss(d_ct(pct, detach_params=True))
    metrics["cycle"] = l1(rec_ct, ct) + l1(rec_mr, mri)
    gen_loss = metrics["g_adv_ct2mr"] + metrics["g_adv_mr2ct"] + w.lambda_cycle * metrics["cycle"]
    if w.lambda_identity > 0:
      metrics["identity"] = l1(g(mri), mri) + l1(f(ct), ct)
      gen_loss = gen_loss + w.lambda_cycle * w.lambda_identity * metrics["identity"]
    metrics["gen_total"] = gen_loss
    metrics["d_mr"] = lsgan_discriminator_loss(d_mr(mri), d_mr(self.pools["mr"].query(pmri)))
    metrics["d_ct"] = lsgan_discriminator_loss(d_ct(ct), d_ct(self.pools["ct"].query(pct)))
    total = gen_loss + metrics["d_mr"] + metrics["d_ct"]

    t_logits, t_feats = nets["teacher"](scale_gradient(pmri, w.lambda_seg))
    metrics["teacher_seg"] = segmentation_loss(t_logits, label, w.dice_weight, w.dice_smooth)
    s_logits, s_feats = nets["student"](ct)
    metrics["student_seg"] = segmentation_loss(s_logits, label, w.dice_weight, w.dice_smooth)
    total = total + metrics["teacher_seg"] + metrics["student_seg"]
    if w.lambda_hint > 0:
      metrics["hint"] = hint_loss([s_feats[n] for n in self.hint_features], [t_feats[n] for n in self.hint_features])
      total = total + w.lambda_hint * metrics["hint"]
    metrics["total"] = total
    images = {"pmri": pmri, "pct": pct, "teacher_logits": t_logits, "student_logits": s_logits}
    return total, metrics, images

  def step(self, batch: Mapping[str, Any]) -> dict[str, float]:
    """One training step on an NHWC batch {"ct", "ct_label", "mri"} (numpy); returns the metrics as floats,
    including ``grad_norm_{gen,disc,seg}`` (before clipping, like the JAX step)."""
    if not self.optimizers:
      raise ValueError("no optimizers: build with CMEDLStep.from_config or pass optimizers=")
    ct, label, mri = (t.to(self.device) for t in to_torch_batch(batch))
    for opt in self.optimizers.values():
      opt.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
      total, metrics, _ = self._losses(ct, label, mri)
    total.backward()
    for group, opt in self.optimizers.items():
      metrics[f"grad_norm_{group}"] = opt.grad_norm()
      opt.step()
    return {k: float(v.detach()) for k, v in metrics.items()}

  def state_dicts(self) -> dict[str, dict[str, np.ndarray]]:
    """{network name: state_dict as numpy copies} (for :func:`cmedl_jax.torch_port.bridge.train_state_from_torch`)."""
    return {name: reference.state_dict_numpy(net) for name, net in self.networks.items()}


def to_torch_batch(batch: Mapping[str, Any]):
  """NHWC numpy batch -> (ct (N, 1, H, W), label (N, H, W) int64, mri (N, 1, H, W))."""
  label = torch.from_numpy(np.ascontiguousarray(np.asarray(batch["ct_label"]).astype(np.int64)))
  return reference.to_nchw(batch["ct"]), label, reference.to_nchw(batch["mri"])


def _options(fields, arch, ignore=(), rename=None):
  """A config's network fields -> ``reference.build`` options (unsupported fields are errors, not ignored)."""
  rename = dict(rename or {})
  out = {}
  for key, value in dict(fields).items():
    if key in ignore or (key == "norm" and value == "instance"):  # instance norm is the reference's only norm
      continue
    key = rename.get(key, key)
    supported = set(convert.DEFAULT_OPTIONS.get(arch, {})) | {"drop_rate"}
    if key not in supported:
      raise NotImplementedError(f"the PyTorch reference {arch} has no option {key!r}")
    out[key] = tuple(value) if isinstance(value, (list, tuple)) else value
  return out
