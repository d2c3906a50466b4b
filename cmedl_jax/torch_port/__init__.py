"""PyTorch interoperability: weight import for the reference architectures, and PyTorch reference code.

- :mod:`convert` (no torch needed, except to read a file): PyTorch ``state_dict`` <-> flax variables for the
  CycleGAN generator and discriminator, the milesial U-Net and FC-DenseNet, with key-by-key checking.
- :mod:`cli`: ``cmedl-convert-torch``.
- :mod:`bridge`: a JAX CMEDL train state holding PyTorch weights.
- :mod:`reference`, :mod:`reference_step` (import torch): the PyTorch reference networks and one CMEDL train step,
  used by the parity tests and ``python -m cmedl_jax.bench step``.

See docs/pytorch.md. Importing this package does not import torch.
"""

from cmedl_jax.torch_port.convert import (
    ARCHS,
    DEFAULT_OPTIONS,
    Conversion,
    WeightImportError,
    convert_arch,
    convert_file,
    convert_state_dict,
    extract_state_dict,
    load,
    load_checkpoint,
    save,
    variables_to_state_dict,
)

__all__ = [
    "ARCHS",
    "DEFAULT_OPTIONS",
    "Conversion",
    "WeightImportError",
    "convert_arch",
    "convert_file",
    "convert_state_dict",
    "extract_state_dict",
    "load",
    "load_checkpoint",
    "save",
    "variables_to_state_dict",
]
