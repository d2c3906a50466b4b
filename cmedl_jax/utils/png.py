"""Dependency-free PNG writing for image grids (training previews, pipeline previews)."""

from __future__ import annotations

import struct
import zlib

import numpy as np

from cmedl_jax.utils import files


def _chunk(kind, payload):
  return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def write_png(path, image):
  """Writes an 8-bit grayscale (H, W) or RGB (H, W, 3) uint8 array as PNG to ``path`` (a local path or a URL,
  :mod:`cmedl_jax.utils.files`)."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"write_png expects uint8, got {image.dtype}")
  if image.ndim == 2:
    color_type, rows = 0, image
  elif image.ndim == 3 and image.shape[2] == 3:
    color_type, rows = 2, image.reshape(image.shape[0], -1)
  else:
    raise ValueError(f"write_png expects (H, W) or (H, W, 3), got {image.shape}")
  raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row
  header = struct.pack(">IIBBBBB", image.shape[1], image.shape[0], 8, color_type, 0, 0, 0)
  files.write_bytes(path, b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 6))
                    + _chunk(b"IEND", b""))
  return path


def to_uint8(image, low=-1.0, high=1.0):
  """Maps [low, high] linearly to 0..255 (clipped)."""
  scaled = (np.asarray(image, np.float32) - low) / (high - low)
  return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def overlay_mask(gray_uint8, mask, color=(255, 64, 64), alpha=0.45):
  """RGB (H, W, 3) uint8: ``gray_uint8`` with ``mask`` (H, W) blended in ``color``."""
  rgb = np.repeat(np.asarray(gray_uint8, np.float32)[..., None], 3, axis=-1)
  mask = np.asarray(mask, bool)[..., None]
  rgb = np.where(mask, (1 - alpha) * rgb + alpha * np.asarray(color, np.float32), rgb)
  return (rgb + 0.5).astype(np.uint8)


def tile(images, columns, pad=2, pad_value=0):
  """Tiles a list of equally shaped (H, W[, 3]) uint8 arrays row-major into one image."""
  images = [np.asarray(im) for im in images]
  h, w = images[0].shape[:2]
  rows = -(-len(images) // columns)
  canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad) + images[0].shape[2:], pad_value, np.uint8)
  for i, im in enumerate(images):
    r, c = divmod(i, columns)
    canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = im
  return canvas
