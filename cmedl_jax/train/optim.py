"""Optimizers of the three parameter groups (generators, discriminators, segmenters)."""

from __future__ import annotations

import optax


def constant_then_linear_decay(learning_rate, total_steps, decay_start_fraction=0.5):
  """CycleGAN's schedule: ``learning_rate`` for the first part of training, then linearly to 0 at the end."""
  total_steps = max(int(total_steps), 1)
  constant_steps = int(round(total_steps * float(decay_start_fraction)))
  decay_steps = max(total_steps - constant_steps, 1)
  return optax.join_schedules(
      [optax.constant_schedule(learning_rate),
       optax.linear_schedule(learning_rate, 0.0, decay_steps)],
      boundaries=[constant_steps])


def make_optimizer(cfg, total_steps):
  """Adam (or plain SGD, ``name="sgd"``, for exactness tests) with the schedule of ``cfg``.

  Fields: name ("adam"), lr, b1, b2, decay_start_fraction, weight_decay, grad_clip.
  """
  schedule = constant_then_linear_decay(cfg.lr, total_steps, cfg.get("decay_start_fraction", 0.5))
  chain = []
  if cfg.get("grad_clip", 0.0):
    chain.append(optax.clip_by_global_norm(cfg.grad_clip))
  if cfg.get("name", "adam") == "sgd":
    chain.append(optax.sgd(schedule))
  elif cfg.get("name", "adam") != "adam":
    raise ValueError(f"unknown optimizer {cfg.name!r}; expected 'adam' or 'sgd'")
  elif cfg.get("weight_decay", 0.0):
    chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))
  else:
    chain.append(optax.adam(schedule, b1=cfg.b1, b2=cfg.b2))
  return optax.chain(*chain)
