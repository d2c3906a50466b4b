"""Default configuration of a CMEDL run (docs/design.md defaults); ``configs/*.py`` start from :func:`base_config`.

Every field, with its default and meaning:

method                     "cmedl" | "ct_only" | "pmri_only" | "ct_pmri_concat"
translator                 "cyclegan" | "cut" (unused by ct_only)
seed                       model init / train randomness; the data stream uses data.seed
conv_backend               the CPU form of the convolutions and pooling (cmedl_jax.ops, docs/performance.md):
                           "auto" (the library's kernels through XLA's FFI when it can be built on this machine,
                           else "xla", with a warning), "onednn" (fail if it cannot be built), "xla" (XLA:CPU's
                           fast forms), "plain" (lax.conv_general_dilated / reduce_window and JAX's autodiff, as
                           on GPU/TPU); all are bitwise reproducible. GPU/TPU programs always hold the plain form
conv_algorithm             "onednn" kernels: "winograd" (3x3 stride-1 layers with channels in multiples of 8 as
                           Winograd F(4x4, 3x3) on AVX2 CPUs: 2-4x faster on the paper networks' layers, ~1e-5
                           relative error; other layers direct) or "direct" (oneDNN's direct kernels for them)
init_from.NAME             "" (fresh init) or a cmedl-convert-torch output folder whose weights start network NAME
                           (gen_ct2mr, gen_mr2ct, disc_mr, disc_ct, teacher, student) of a new run; a resumed
                           run takes its weights from its checkpoint instead
data.ct_dir, data.mri_dir  dataset folders (nnU-Net/MSD layout, see cmedl_jax.data.dataset_index)
data.make_phantoms         generate phantoms into data.phantoms.out when the folders are missing
data.crop_size             square training crop in pixels (paper: 256)
data.global_batch_size     examples per step over all devices/processes (divisible by the device count)
data.foreground_fraction   probability of a tumor-centred CT crop (nnU-Net style oversampling: 0.33)
data.ct_window             HU window mapped to [-1, 1] ((-1000, 500))
data.mri_percentiles       per-scan clipping percentiles mapped to [-1, 1] ((0.5, 99.5))
data.num_workers           grain worker processes (0: in-process; values never change the stream)
model.segmenter            "unet" | "densefcn" | "pspnet" (teacher and student share it)
model.segmenter_kwargs     passed to the segmenter (e.g. features=(8, 16, 32, 32) for tiny U-Nets)
model.num_classes          2 (background, tumor)
model.hint_features        names of the distilled decoder feature maps; () = the segmenter's last two decoder
                           maps (its hint_feature_names(), e.g. U-Net ("up3", "up4"))
model.generator            ResnetGenerator fields: base_features 64, num_blocks 9, use_dropout False
model.discriminator        PatchGAN fields: base_features 64, num_layers 3 (70x70)
model.nce                  CUT: layers (0, 4, 8, 12, 16), num_patches 256, temperature 0.07, mlp_features 256
loss.lambda_cycle          10 (CycleGAN cycle L1 weight)
loss.lambda_identity       0.5 (identity L1 weight relative to lambda_cycle: 0.5 x 10 = 5)
loss.lambda_seg            1.0, weight of the teacher's segmentation loss in the generator's gradient
loss.lambda_hint           1.0, weight of the feature-distillation (hint) loss in the student's gradient
loss.lambda_nce            1.0 (CUT)
loss.nce_identity          True: CUT's identity NCE loss on G(MRI)
loss.dice_weight           1.0: segmentation loss = CE + dice_weight * soft Dice
loss.dice_smooth           1.0: soft Dice smoothing (per sample)
pool_size                  50 fakes in each discriminator's image pool (0 disables)
optim.{gen,disc,seg}       Adam lr / b1 / b2, constant then linear decay to 0 from decay_start_fraction
                           (gen, disc: 2e-4, 0.5, 0.999; seg: 2e-4, 0.9, 0.999), optional grad_clip
train.total_steps          optimizer steps
train.backend              "shard_map" (jit + shard_map over a ("data",) mesh) | "pmap"
train.log_every            steps between logged (CSV, TensorBoard) metrics; the loop syncs with the host only at
                           log, checkpoint and preview steps
train.checkpoint_every     steps between checkpoints (also saved at the end and on SIGTERM)
train.preview_every        steps between PNG grids (0: never)
train.keep_checkpoints     checkpoints kept
train.async_checkpoint     orbax async saves
train.prefetch_to_device   batches transferred to the devices ahead of the step that consumes them (2; 0: none)
data.phantoms              generated phantoms: out folder, num_ct, num_mri, num_test (held-out CT cases written
                           to OUT/test/CT with seed + 1), size (in-plane voxels), slices, seed
eval.batch_size            slices per jitted inference batch (fixed shape, padded with a mask)
eval.data_dir              labelled CT folder evaluated when training finishes ("" = none); cmedl-evaluate
                           evaluates any folder later
eval.tolerances_mm         surface Dice tolerances ((2.0, 4.0))
eval.hd95_convention       "deepmind" (default) | "monai" | "medpy"
"""

from __future__ import annotations

import ml_collections

# Networks that init_from can start from PyTorch weights (cmedl-convert-torch has no CUT PatchNCE head).
INIT_FROM_NETWORKS = ("gen_ct2mr", "gen_mr2ct", "disc_mr", "disc_ct", "teacher", "student")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "cmedl"
  c.translator = "cyclegan"
  c.seed = 0
  c.conv_backend = "auto"
  c.conv_algorithm = "winograd"
  c.init_from = ml_collections.ConfigDict({name: "" for name in INIT_FROM_NETWORKS})

  c.data = ml_collections.ConfigDict(dict(
      ct_dir="", mri_dir="", make_phantoms=False, seed=0, crop_size=256, global_batch_size=8,
      foreground_fraction=0.33, ct_window=(-1000.0, 500.0), mri_percentiles=(0.5, 99.5), num_workers=0,
      phantoms=dict(out="", num_ct=12, num_mri=12, num_test=0, size=128, slices=48, seed=0)))

  c.model = ml_collections.ConfigDict(dict(
      segmenter="unet", segmenter_kwargs={}, num_classes=2, hint_features=(),
      generator=dict(base_features=64, num_blocks=9, use_dropout=False),
      discriminator=dict(base_features=64, num_layers=3),
      nce=dict(layers=(0, 4, 8, 12, 16), num_patches=256, temperature=0.07, mlp_features=256)))

  c.loss = ml_collections.ConfigDict(dict(
      lambda_cycle=10.0, lambda_identity=0.5, lambda_seg=1.0, lambda_hint=1.0, lambda_nce=1.0,
      nce_identity=True, dice_weight=1.0, dice_smooth=1.0))
  c.pool_size = 50

  translator_adam = dict(lr=2e-4, b1=0.5, b2=0.999, decay_start_fraction=0.5, grad_clip=0.0)
  c.optim = ml_collections.ConfigDict(dict(
      gen=dict(translator_adam), disc=dict(translator_adam),
      seg=dict(lr=2e-4, b1=0.9, b2=0.999, decay_start_fraction=0.5, grad_clip=0.0)))

  c.train = ml_collections.ConfigDict(dict(
      total_steps=20000, backend="shard_map", log_every=50, checkpoint_every=1000, preview_every=1000,
      keep_checkpoints=3, async_checkpoint=True, prefetch_to_device=2))
  c.eval = ml_collections.ConfigDict(dict(batch_size=16, data_dir="", tolerances_mm=(2.0, 4.0),
                                           hd95_convention="deepmind"))
  return c


def load_config_file(path, arg=None) -> ml_collections.ConfigDict:
  """``get_config(arg)`` (or ``get_config()`` when ``arg`` is None) of a config file, as cmedl-train reads it.

  Raises:
    DataError: ``path`` is not a file.
  """
  import importlib.util
  import os
  from cmedl_jax.errors import DataError
  if not os.path.isfile(path):
    raise DataError(path, "config file does not exist")
  spec = importlib.util.spec_from_file_location("cmedl_config_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()
