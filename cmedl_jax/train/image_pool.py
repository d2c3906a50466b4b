"""CycleGAN's history of generated images (Shrivastava et al. 2017), as a pure function on arrays.

The discriminator sees a mix of the newest fakes and older ones from a pool of ``size`` images. The pool lives in
the train state; under data parallelism every device holds the same pool and queries it with the same key on the
all-gathered global batch, so results do not depend on the number of devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init_pool(size, image_shape, dtype=jnp.float32):
  """An empty pool: {'images': (size, H, W, C), 'count': () int32}."""
  return {"images": jnp.zeros((size,) + tuple(image_shape), dtype), "count": jnp.zeros((), jnp.int32)}


def query_pool(pool, images, key):
  """Returns (images for the discriminator, new pool), following CycleGAN's ImagePool.query image by image.

  While the pool is not full, each new image is stored and returned. Once full, with probability 1/2 a random
  stored image is returned and replaced by the new one; otherwise the new image is returned.

  Args:
    pool: from :func:`init_pool` (size 0 disables the pool).
    images: (B, H, W, C) new fakes (gradients are stopped).
    key: PRNG key.
  """
  images = jax.lax.stop_gradient(images)
  size = pool["images"].shape[0]
  if size == 0:
    return images, pool

  def one(carry, inputs):
    stored, count = carry
    image, k = inputs
    k_swap, k_idx = jax.random.split(k)
    not_full = count < size
    swap = jax.random.uniform(k_swap) > 0.5
    idx = jnp.where(not_full, count, jax.random.randint(k_idx, (), 0, size))
    returned = jnp.where(not_full | ~swap, image, stored[idx])
    write = not_full | swap
    stored = stored.at[idx].set(jnp.where(write, image, stored[idx]))
    return (stored, jnp.minimum(count + 1, size)), returned

  keys = jax.random.split(key, images.shape[0])
  (stored, count), out = jax.lax.scan(one, (pool["images"], pool["count"]), (images, keys))
  return out, {"images": stored, "count": count}
