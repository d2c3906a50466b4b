"""Loss terms of CMEDL. All return scalars averaged over the (local) batch, so that averaging them over equal
data-parallel shards (``lax.pmean``) gives the loss of the global batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lsgan_generator_loss(fake_logits):
  """Least-squares GAN, generator side: push D(fake) to 1."""
  return jnp.mean(jnp.square(fake_logits - 1.0))


def lsgan_discriminator_loss(real_logits, fake_logits):
  """Least-squares GAN, discriminator side: 0.5 * (E(D(real)-1)^2 + E D(fake)^2), as in CycleGAN."""
  return 0.5 * (jnp.mean(jnp.square(real_logits - 1.0)) + jnp.mean(jnp.square(fake_logits)))


def l1(a, b):
  return jnp.mean(jnp.abs(a - b))


def softmax_cross_entropy(logits, labels):
  """Mean pixel-wise CE. logits (B, H, W, K) float; labels (B, H, W) int."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return -jnp.mean(picked)


def soft_dice_loss(logits, labels, smooth=1.0, include_background=False):
  """1 - mean soft Dice over samples and (foreground) classes.

  Dice is computed per sample and class (sums over H, W), then averaged: per-sample Dice keeps the loss of a
  data-parallel shard an unbiased piece of the global batch's loss, unlike a batch-pooled Dice. ``smooth`` keeps
  tumor-free slices from dominating: a confident empty prediction there scores ~1.

  Args:
    logits: (B, H, W, K).
    labels: (B, H, W) int in [0, K).
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  if not include_background:
    probs, onehot = probs[..., 1:], onehot[..., 1:]
  intersection = jnp.sum(probs * onehot, axis=(1, 2))
  denominator = jnp.sum(probs, axis=(1, 2)) + jnp.sum(onehot, axis=(1, 2))
  dice = (2.0 * intersection + smooth) / (denominator + smooth)
  return 1.0 - jnp.mean(dice)


def segmentation_loss(logits, labels, dice_weight=1.0, dice_smooth=1.0):
  """Softmax cross-entropy + soft Dice (docs/design.md)."""
  return softmax_cross_entropy(logits, labels) + dice_weight * soft_dice_loss(logits, labels, dice_smooth)


def hint_loss(student_features, teacher_features):
  """Feature distillation: sum over the chosen layers of the MSE between student and stop-gradient(teacher)."""
  total = 0.0
  for s, t in zip(student_features, teacher_features):
    if s.shape != t.shape:
      raise ValueError(f"hint layers differ in shape: student {s.shape} vs teacher {t.shape}")
    total = total + jnp.mean(jnp.square(s.astype(jnp.float32) - jax.lax.stop_gradient(t).astype(jnp.float32)))
  return total


def scale_gradient(x, scale):
  """Identity forward; multiplies the gradient flowing back through ``x`` by ``scale``.

  Lets one forward pass of the teacher on G(CT) give the teacher the full segmentation gradient while the
  generator receives ``lambda_seg`` times it.
  """
  return jax.lax.stop_gradient(x) + scale * (x - jax.lax.stop_gradient(x))
