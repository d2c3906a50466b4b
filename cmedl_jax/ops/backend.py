"""Which implementation the ops of :mod:`cmedl_jax.ops` run on the CPU, chosen by a context, not a global.

Every op stages out two forms with ``lax.platform_dependent`` (docs/design.md, "Kernels"): a CPU form and the plain
form (``lax.conv_general_dilated`` / ``lax.reduce_window`` with JAX's own autodiff). XLA compiles the form of the
platform the program is lowered for, so GPU and TPU programs hold the plain form whatever is chosen here. What is
chosen here is the CPU form:

=========  ==========================================================================================================
backend    CPU form
=========  ==========================================================================================================
auto       ``onednn`` where the library builds on this machine, else ``xla``, with one warning naming the reason
           (default)
onednn     the library's convolutions through XLA's FFI (:mod:`cmedl_jax.ops.onednn`); fails where it cannot be built
xla        XLA forms tuned for XLA:CPU (:mod:`cmedl_jax.ops.xla_cpu`)
plain      the plain form on the CPU too
=========  ==========================================================================================================

``algorithm`` ("winograd" | "direct") selects the library's 3x3 stride-1 kernels (``onednn`` only). In a process whose
default platform is a GPU or TPU, ``auto`` and ``onednn`` give ``xla`` (:func:`cpu_form`): nothing is built there.

The choice is read when a function is traced: :func:`use` sets it for the code traced inside it, :func:`using` wraps
a function so that its body (every trace of it, e.g. under ``jax.jit``) runs inside it, and each op also takes it
as an argument.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import warnings

import jax

BACKENDS = ("auto", "onednn", "xla", "plain")
ALGORITHMS = ("winograd", "direct")


@dataclasses.dataclass(frozen=True)
class Kernels:
  """The CPU implementation of the ops (see the module docstring).

  Attributes:
    backend: "auto" | "onednn" | "xla" | "plain".
    algorithm: "winograd" | "direct" (3x3 stride-1 convolutions of the onednn backend).
  """

  backend: str = "auto"
  algorithm: str = "winograd"

  def __post_init__(self):
    if self.backend not in BACKENDS:
      raise ValueError(f"conv_backend must be one of {BACKENDS}, got {self.backend!r}")
    if self.algorithm not in ALGORITHMS:
      raise ValueError(f"conv_algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")


_current: contextvars.ContextVar[Kernels] = contextvars.ContextVar("cmedl_kernels", default=Kernels())
_warned_fallback: list = []


def from_config(cfg) -> Kernels:
  """The kernels of a run's config (``conv_backend``, ``conv_algorithm``; runs saved before them: the defaults)."""
  return Kernels(cfg.get("conv_backend", "auto"), cfg.get("conv_algorithm", "winograd"))


@contextlib.contextmanager
def use(kernels: Kernels):
  """Ops traced inside this context use ``kernels`` (unless given their own)."""
  token = _current.set(kernels)
  try:
    yield kernels
  finally:
    _current.reset(token)


def using(kernels: Kernels, fn):
  """``fn`` whose body runs inside ``use(kernels)``: jit it, and every trace of it sees ``kernels``."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with use(kernels):
      return fn(*args, **kwargs)

  return wrapped


def current() -> Kernels:
  """The kernels set by the innermost :func:`use` (default: ``Kernels()``)."""
  return _current.get()


def cpu_form(kernels: Kernels | None = None) -> str:
  """What the CPU form of the ops traced now is: "onednn", "xla" or "plain".

  "auto" and "onednn" give "xla" in a process whose default platform is not the CPU: its programs run on the GPU or
  TPU and hold the plain form; the CPU branch, for its rare CPU programs, is not worth building C++ for (nor failing
  on a host without a compiler).

  Raises:
    cmedl_jax.ops.onednn.OnednnUnavailable: backend "onednn" on a CPU where the library cannot be built or loaded.
  """
  from cmedl_jax.ops import onednn  # builds nothing until load()
  kernels = kernels or current()
  if kernels.backend in ("xla", "plain"):
    return kernels.backend
  if jax.default_backend() != "cpu":
    return "xla"
  if kernels.backend == "onednn":
    onednn.load()
    return "onednn"
  if onednn.available():
    return "onednn"
  if not _warned_fallback:
    _warned_fallback.append(True)
    warnings.warn("cmedl_jax: using XLA's (slower) CPU convolutions: " + onednn.unavailable_reason(), stacklevel=2)
  return "xla"
