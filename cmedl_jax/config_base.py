"""Default configuration of a CMEDL run; ``configs/*.py`` start from :func:`base_config`.

Every field is commented at its default in :func:`base_config` (docs/design.md gives the method's defaults).
Config files take their argument as ``key=value`` pairs (``configs/cmedl.py:translator=cut,segmenter=unet``),
parsed by :func:`parse_arg`; :mod:`cmedl_jax.config_validation` checks a whole config before a run starts.
"""

from __future__ import annotations

import difflib
from typing import Mapping, Sequence

import ml_collections

from cmedl_jax.errors import ConfigError
from cmedl_jax.models.resnet_generator import CUT_NCE_LAYERS
from cmedl_jax.train import networks


def _adam(lr, b1):
  return dict(
      name="adam",                 # "adam" | "sgd" (plain SGD, for exactness tests)
      lr=lr,                       # peak learning rate
      b1=b1, b2=0.999,             # Adam moments
      decay_start_fraction=0.5,    # constant lr for this fraction of train.total_steps, then linear decay to 0
      weight_decay=0.0,            # > 0: AdamW
      grad_clip=0.0,               # > 0: clip the group's global gradient norm to this
  )


# The in-plane pixel size the paper-scale configs (configs/cmedl.py, baselines.py, ablations.py) resample every scan
# to: the lung CTs of the paper's setting are 0.6-1.0 mm in-plane and the T2w MRIs about 1 mm, so 256 px crops
# cover about 26 cm of either modality at one scale.
PAPER_TARGET_SPACING_MM = (1.0, 1.0)


def _intensity_augment():
  return dict(
      brightness_prob=0.15, brightness_range=(0.75, 1.25),  # multiply intensities (in [0, 1] units)
      contrast_prob=0.15, contrast_range=(0.75, 1.25),      # scale about the crop's mean
      gamma_prob=0.3, gamma_range=(0.7, 1.5),               # gamma on the crop's own range
      noise_prob=0.1, noise_std_max=0.1,                    # Gaussian noise, std uniform in [0, max]
  )


def base_config() -> ml_collections.ConfigDict:
  """The defaults of every field (a paper-scale CMEDL run: CycleGAN + U-Nets on 256 px crops)."""
  c = ml_collections.ConfigDict()
  c.method = "cmedl"               # a method of cmedl_jax.train.methods: cmedl | ct_only | pmri_only | ct_pmri_concat
  c.translator = "cyclegan"        # cyclegan | cut (unused by ct_only)
  c.seed = 0                       # model init and the step's randomness (the data stream uses data.seed)
  # CPU form of the convolutions and pooling (cmedl_jax.ops, docs/performance.md): "auto" (the library's oneDNN
  # kernels through XLA's FFI where they build on this machine, else "xla", with a warning), "onednn" (fail if
  # they cannot be built), "xla" (XLA:CPU's fast forms), "plain" (lax convolutions and JAX's autodiff, as on
  # GPU/TPU). All are bitwise reproducible; GPU/TPU programs always hold the plain form.
  c.conv_backend = "auto"
  c.conv_algorithm = "winograd"    # "onednn" kernels: winograd (3x3 stride-1 layers, channels in multiples of 8,
  #                                  on AVX2 CPUs; ~1e-5 relative error) | direct
  # Activations and convolutions: "float32" | "bfloat16" (mixed precision: parameters, optimizer states, BatchNorm
  # statistics and every loss reduction stay float32; docs/design.md, "Mixed precision"). On the CPU, bfloat16
  # convolutions take XLA's forms (the library's kernels are float32).
  c.compute_dtype = "float32"
  # init_from.NAME: "" (fresh init) or a cmedl-convert-torch output folder whose weights start network NAME of a
  # new run (a resumed run takes its weights from its checkpoint).
  c.init_from = ml_collections.ConfigDict({name: "" for name, role in networks.ROLES.items() if role.from_torch})

  c.data = ml_collections.ConfigDict(dict(
      ct_dir="",                   # labelled CT dataset folder (nnU-Net/MSD layout, cmedl_jax.data.dataset_index)
      mri_dir="",                  # unpaired MRI dataset folder (labels not needed)
      make_phantoms=False,         # generate phantoms (data.phantoms) when the folders are missing
      seed=0,                      # the data stream: example g is a pure function of (seed, g)
      crop_size=256,               # square training crop in pixels (paper: 256); a multiple of what the networks
      #                              need (the generator: 4)
      global_batch_size=8,         # examples per step over all devices and processes (divisible by the devices)
      foreground_fraction=0.33,    # probability of a tumour-centred CT crop (nnU-Net's oversampling)
      ct_window=(-1000.0, 500.0),  # HU window mapped to [-1, 1]
      mri_percentiles=(0.5, 99.5),  # per-scan clipping percentiles mapped to [-1, 1]
      # Preprocessed, memory-mapped cases (cmedl_jax.data.store; `cmedl-data preprocess` makes them ahead of time).
      cache_dir="",                # "" = $CMEDL_CACHE_DIR, else ~/.cache/cmedl_jax/preprocessed (never inside a
      #                              dataset folder)
      target_spacing_mm=(),        # in-plane pixel size (x, y) in mm every scan is resampled to for training,
      #                              validation, evaluation and prediction; () keeps each scan's own spacing
      image_interpolation="linear",  # linear | cubic (images; cmedl_jax.data.resample)
      label_interpolation="linear_per_class",  # linear_per_class (nnU-Net's) | nearest (label maps)
      num_workers=0,               # grain worker processes (0: in-process; never changes the stream)
      val_cases=0,                 # CT cases split off for validation (seeded by data.seed; WORKDIR/splits.json)
      augment=dict(                # seeded augmentation of the training crops (cmedl_jax.data.augment)
          enabled=True,
          flip_prob=0.5,           # mirror each in-plane axis
          rotate_prob=0.2, rotate_max_deg=15.0,      # rotation about the crop centre, uniform in +-max
          scale_prob=0.2, scale_range=(0.85, 1.25),  # isotropic zoom (> 1 magnifies)
          ct=dict(_intensity_augment()),             # intensity transforms of the CT crops
          mri=dict(_intensity_augment())),           # ... of the MRI crops
      phantoms=dict(               # generated by cmedl_jax.train.job when data.make_phantoms is set
          out="",                  # folder (default: beside data.ct_dir)
          num_ct=12, num_mri=12,   # labelled CT and unpaired MRI cases
          num_test=0,              # held-out CT cases written to OUT/test/CT with seed + 1
          size=128, slices=48,     # in-plane voxels, slices
          seed=0),
  ))

  c.model = ml_collections.ConfigDict(dict(
      segmenter="unet",            # unet | densefcn | pspnet (teacher and student share it)
      segmenter_kwargs={},         # passed to the segmenter, e.g. features=(8, 16, 32, 32) for a tiny U-Net
      num_classes=2,               # background, tumour
      hint_features=(),            # distilled decoder feature maps; () = the segmenter's last two
      #                              (hint_feature_names(), e.g. U-Net ("up3", "up4"))
      generator=dict(base_features=64, num_blocks=9, use_dropout=False),  # ResnetGenerator (CycleGAN's)
      discriminator=dict(base_features=64, num_layers=3),                 # PatchGAN (70x70)
      nce=dict(                    # CUT's PatchNCE
          layers=CUT_NCE_LAYERS,   # generator layers whose features are contrasted (0, 4, 8, 12, 16)
          num_patches=256,         # patches per layer and image
          temperature=0.07,
          mlp_features=256),       # projection head width
  ))

  c.loss = ml_collections.ConfigDict(dict(
      lambda_cycle=10.0,           # CycleGAN cycle L1 weight
      lambda_identity=0.5,         # identity L1 weight relative to lambda_cycle (0.5 x 10 = 5)
      lambda_seg=1.0,              # weight of the teacher's segmentation loss in the generator's gradient
      lambda_hint=1.0,             # weight of the hint (feature distillation) loss in the student's gradient
      lambda_nce=1.0,              # CUT's PatchNCE weight
      nce_identity=True,           # CUT's identity NCE loss on G(MRI)
      dice_weight=1.0,             # segmentation loss = cross-entropy + dice_weight * soft Dice
      dice_smooth=1.0,             # soft Dice smoothing (per sample, > 0)
  ))
  c.pool_size = 50                 # generated images in each discriminator's pool (0: none)

  c.optim = ml_collections.ConfigDict(dict(  # one optimizer per group of networks
      gen=_adam(2e-4, 0.5),        # generators (and CUT's head)
      disc=_adam(2e-4, 0.5),       # discriminators
      seg=_adam(2e-4, 0.9),        # teacher and student
  ))

  c.train = ml_collections.ConfigDict(dict(
      total_steps=20000,           # optimizer steps
      backend="shard_map",         # shard_map (jit over a ("data",) mesh) | pmap
      log_every=50,                # steps between logged metrics (CSV, TensorBoard); the loop syncs with the
      #                              host only at log, checkpoint and preview steps
      checkpoint_every=1000,       # steps between checkpoints (also at the end and on SIGTERM)
      preview_every=1000,          # steps between PNG previews (0: never)
      keep_checkpoints=3,          # checkpoints kept
      async_checkpoint=True,       # orbax writes the arrays in the background
      prefetch_to_device=2,        # batches transferred to the devices ahead of their step (0: none)
      val_every=1000,              # steps between validations (and at the last step) when there are validation
      #                              cases (data.val_cases or eval.val_dir); 0: never
  ))
  c.eval = ml_collections.ConfigDict(dict(
      batch_size=16,               # slices per jitted inference batch (fixed shape, padded with a mask)
      data_dir="",                 # labelled CT folder evaluated when training finishes ("": none)
      out_dir="",                  # its results; "" = WORKDIR/eval/<folder name>-<path hash>/step_<N>, a relative
      #                              path lies in WORKDIR
      val_dir="",                  # labelled CT folder validated during training ("": data.val_cases, if any)
      best_metric="dice",          # dice | surface_dice (at the first tolerance): picks WORKDIR/best
      tolerances_mm=(2.0, 4.0),    # surface Dice tolerances (evaluation and validation)
      hd95_convention="deepmind",  # deepmind | monai | medpy
  ))
  return c


def parse_arg(arg, choices: Mapping[str, Sequence[str]], defaults: Mapping[str, str], config_file: str):
  """A config file's ``key=value,key=value`` argument, checked against ``choices``.

  Args:
    arg: the text after ``FILE.py:`` (None or "": all defaults).
    choices: {key: allowed values}.
    defaults: {key: value} for keys not given.
    config_file: the file's name, for the messages.

  Returns:
    {key: value} for every key of ``choices``.

  Raises:
    ConfigError: an unknown key, a value not allowed, or the positional form of earlier versions (the message
      shows the key=value form).
  """
  values = dict(defaults)
  for item in [part.strip() for part in (arg or "").split(",") if part.strip()]:
    if "=" not in item:
      guess = [f"{key}={item}" for key, allowed in choices.items() if item in allowed]
      example = ",".join(guess) if guess else ",".join(f"{k}={v}" for k, v in defaults.items())
      raise ConfigError(config_file, f"{item!r}: the argument is key=value pairs, e.g. {config_file}:{example} "
                                     f"(keys: {', '.join(choices)})")
    key, value = (x.strip() for x in item.split("=", 1))
    if key not in choices:
      near = difflib.get_close_matches(key, list(choices), n=1)
      hint = f" (did you mean {near[0]}?)" if near else ""
      raise ConfigError(config_file, f"unknown key {key!r}{hint}; keys: {', '.join(choices)}")
    if value not in choices[key]:
      raise ConfigError(config_file, f"{key}={value!r}: allowed values are {', '.join(choices[key])}")
    values[key] = value
  return values


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
