"""CUT's PatchNCE: patch sampling, the per-layer MLP projection head and the contrastive loss.

Reference: taesungp/contrastive-unpaired-translation, ``PatchSampleF`` (``--netF mlp_sample``) in
``models/networks.py``, ``PatchNCELoss`` in ``models/patchnce.py`` and ``CUTModel.calculate_NCE_loss``:

- for every NCE layer, ``num_patches`` (256) spatial locations are drawn without replacement; the *same* locations
  are used for every image of the batch and for the source (keys) and translated (queries) features;
- each sampled C-vector goes through a per-layer MLP Linear(C, 256) - ReLU - Linear(256, 256) and is L2-normalised
  (``x / (||x|| + 1e-7)``);
- the loss of a query is the cross-entropy of [q.k+, q.k-_1, ...] / tau (tau = 0.07) with target 0, where the
  negatives are the keys of the *other* sampled locations of the same image
  (``nce_includes_all_negatives_from_minibatch=False``); the self-similarity entry of the negative matrix is
  replaced by -10 before the softmax (it duplicates the positive), and keys are detached.

Parameter names: ``mlp_{l}.0.weight`` / ``mlp_{l}.2.weight`` -> ``mlp_{l}_0/kernel`` / ``mlp_{l}_2/kernel``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmedl_jax.models import initializers

NCE_TEMPERATURE = 0.07
NUM_PATCHES = 256
MLP_FEATURES = 256
L2_EPS = 1e-7
DIAGONAL_LOGIT = -10.0


def sample_patch_ids(key, feature_shapes: Sequence[Sequence[int]], num_patches: int = NUM_PATCHES):
  """Draws the sampled locations for every NCE layer (CUT's ``torch.randperm(H * W)[:num_patches]``).

  Args:
    key: PRNG key.
    feature_shapes: (N, H, W, C) shape of each layer's features.
    num_patches: locations per layer (fewer if a layer has fewer than that).

  Returns:
    A list of int32 arrays of flat indices into H * W, one per layer. Reuse it for the source and the translated
    features.
  """
  ids = []
  for layer, shape in enumerate(feature_shapes):
    locations = int(shape[1]) * int(shape[2])
    perm = jax.random.permutation(jax.random.fold_in(key, layer), locations)
    ids.append(perm[:min(num_patches, locations)].astype(jnp.int32))
  return ids


def gather_patches(feature, patch_ids):
  """(N, H, W, C) features at flat locations ``patch_ids`` (P,) -> (N * P, C), image-major like CUT."""
  n, h, w, c = feature.shape
  return jnp.take(feature.reshape(n, h * w, c), patch_ids, axis=1).reshape(-1, c)


def l2_normalize(x, eps: float = L2_EPS):
  """CUT's ``Normalize(2)``: x / (||x||_2 + eps) along the last axis.

  Same values as CUT; the gradient is also finite for an all-zero vector (e.g. a ReLU feature that is zero in every
  channel through a zero-bias MLP), where d sqrt(s)/ds = inf would turn the whole update into NaN.
  """
  squared = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  positive = squared > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)
  return x / (norm + eps)


class PatchSampleMLP(nn.Module):
  """CUT's ``PatchSampleF`` with ``use_mlp=True``: gather, per-layer 2-layer MLP, L2 normalisation.

  Attributes:
    features: MLP width (``netF_nc``, 256).
    use_mlp: project with the MLPs (``mlp_sample``) or only normalise (``sample``).
    init_type, init_gain: weight init (CUT's default is xavier with gain 0.02).
  """

  features: int = MLP_FEATURES
  use_mlp: bool = True
  init_type: str = "xavier"
  init_gain: float = 0.02

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array], patch_ids: Sequence[jax.Array]):
    """Projects the sampled locations of every layer.

    Args:
      feats: per layer (N, H, W, C_l).
      patch_ids: per layer (P_l,) flat locations from :func:`sample_patch_ids`.

    Returns:
      A list of (N * P_l, features) unit vectors (rows ordered image-major).
    """
    if len(feats) != len(patch_ids):
      raise ValueError(f"{len(feats)} feature maps but {len(patch_ids)} patch id arrays")
    kernel_init = initializers.gan_kernel_init(self.init_type, self.init_gain)
    out = []
    for layer, (feat, ids) in enumerate(zip(feats, patch_ids)):
      x = gather_patches(feat, ids)
      if self.use_mlp:
        x = nn.Dense(self.features, kernel_init=kernel_init, name=f"mlp_{layer}_0")(x)
        x = nn.relu(x)
        x = nn.Dense(self.features, kernel_init=kernel_init, name=f"mlp_{layer}_2")(x)
      out.append(l2_normalize(x))
    return out


def patch_nce_loss(feat_q, feat_k, batch_size: int, temperature: float = NCE_TEMPERATURE,
                   include_all_negatives_from_minibatch: bool = False):
  """CUT's ``PatchNCELoss.forward``: per-query cross-entropy (no reduction).

  Args:
    feat_q: (N * P, D) queries (translated image), image-major.
    feat_k: (N * P, D) keys (source image) at the same locations; gradients are stopped.
    batch_size: N (rows are split per image so negatives come from the same image).
    temperature: tau.
    include_all_negatives_from_minibatch: use every key of the batch as a negative (CUT's single-image mode).

  Returns:
    (N * P,) losses.
  """
  feat_k = jax.lax.stop_gradient(feat_k)
  dim = feat_q.shape[-1]
  l_pos = jnp.sum(feat_q * feat_k, axis=-1, keepdims=True)  # (N * P, 1)
  groups = 1 if include_all_negatives_from_minibatch else batch_size
  q = feat_q.reshape(groups, -1, dim)
  k = feat_k.reshape(groups, -1, dim)
  npatches = q.shape[1]
  l_neg = jnp.einsum("gpd,gqd->gpq", q, k)
  l_neg = jnp.where(jnp.eye(npatches, dtype=bool)[None], DIAGONAL_LOGIT, l_neg).reshape(-1, npatches)
  logits = jnp.concatenate([l_pos, l_neg], axis=1) / temperature
  return jax.nn.logsumexp(logits, axis=1) - logits[:, 0]


def multilayer_patch_nce_loss(feats_q, feats_k, batch_size: int, temperature: float = NCE_TEMPERATURE,
                              include_all_negatives_from_minibatch: bool = False):
  """CUT's ``calculate_NCE_loss`` without ``lambda_NCE``: mean over layers of the mean per-query loss.

  Args:
    feats_q: per layer (N * P, D) projected queries (from the translated image).
    feats_k: per layer (N * P, D) projected keys (from the source image, same patch ids).
    batch_size, temperature, include_all_negatives_from_minibatch: see :func:`patch_nce_loss`.

  Returns:
    Scalar loss.
  """
  if len(feats_q) != len(feats_k) or not feats_q:
    raise ValueError("need the same, non-zero number of query and key layers")
  losses = [
      jnp.mean(patch_nce_loss(q, k, batch_size, temperature, include_all_negatives_from_minibatch))
      for q, k in zip(feats_q, feats_k)]
  return sum(losses) / len(losses)
