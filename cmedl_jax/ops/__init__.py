"""The compute kernels under the networks: convolutions, transposed convolutions and max pooling.

Each op has a CPU form and a plain form (``lax`` primitives and JAX's autodiff), staged out per platform with
``lax.platform_dependent``: GPU/TPU programs hold the plain form, CPU programs the form chosen by :class:`Kernels`
(``config.conv_backend`` / ``config.conv_algorithm``), set with :func:`use` / :func:`using` or passed to an op.
Importing this package builds nothing; the library (``csrc/``, :mod:`cmedl_jax.ops.onednn`) is built the first time
a CPU form that needs it is traced. docs/design.md ("Kernels") and docs/performance.md describe the forms.
"""

from cmedl_jax.ops.backend import ALGORITHMS, BACKENDS, Kernels, cpu_form, current, from_config, use, using
from cmedl_jax.ops.conv import conv2d, conv_transpose2d, plain_conv2d, plain_conv_transpose2d
from cmedl_jax.ops.pooling import max_pool_2x2, plain_max_pool_2x2

__all__ = [
    "ALGORITHMS",
    "BACKENDS",
    "Kernels",
    "conv2d",
    "conv_transpose2d",
    "cpu_form",
    "current",
    "from_config",
    "max_pool_2x2",
    "plain_conv2d",
    "plain_conv_transpose2d",
    "plain_max_pool_2x2",
    "use",
    "using",
]
