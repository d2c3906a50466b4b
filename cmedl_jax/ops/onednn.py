"""The library's convolutions inside jitted JAX code on CPU, through XLA's FFI (docs/performance.md).

This module compiles ``csrc/onednn_conv.cc`` once per machine (``g++``) against the oneDNN wheels
(``onednn-cpu-gomp`` and ``onednn-devel-cpu-gomp``, dependencies of cmedl_jax on x86-64 Linux) and jaxlib's FFI
headers, caches the library under ``$CMEDL_ONEDNN_CACHE`` (default ``~/.cache/cmedl_jax/onednn``), registers its
three handlers with XLA for the CPU platform and exposes them as :func:`conv_forward`, :func:`conv_backward_data`
and :func:`conv_backward_weights` (NHWC, HWIO, float32). Nothing is built until :func:`load` (the first trace of a
CPU form that uses it: :mod:`cmedl_jax.ops.backend`).

All calls of the process (every XLA thread, every CPU device) run one at a time on one executor thread of the
library, which shares each call out over the process's cores (``OMP_NUM_THREADS`` if set;
:func:`threads_per_call`) with the library's own thread pool (``csrc/work_pool.h``): its own kernels split their
loops, oneDNN's kernels run as single-threaded parts of the batch, and a batch smaller than the thread count runs
as one oneDNN call with an OpenMP team. Every reduction across threads sums fixed parts in a fixed order, so results
are bitwise reproducible for a given thread count (tests/test_work_pool.py). :func:`profile_start` /
:func:`profile_stop` time the calls per geometry (``python -m cmedl_jax.bench convs``).

``winograd=True`` runs 3x3, stride-1, undilated convolutions with channel counts in multiples of 8 (on AVX2 + FMA
CPUs) as Winograd F(4x4, 3x3) transforms around oneDNN's sgemm (``csrc/winograd.h``): 4x fewer multiplications,
at ~1e-5 relative error (a direct float32 convolution: ~1e-6). Other geometries ignore the flag.
:func:`winograd_applies` says which. Layers with one input or output channel run in the library's own direct
kernels (``csrc/thin_conv.h``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
import threading

import jax
import numpy as np

SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "onednn_conv.cc")
HEADERS = tuple(os.path.join(os.path.dirname(__file__), "csrc", name)
                for name in ("winograd.h", "thin_conv.h", "work_pool.h"))
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "cmedl_jax", "onednn")
_TARGETS = {"forward": "CmedlOnednnConvForward", "backward_data": "CmedlOnednnConvBackwardData",
            "backward_weights": "CmedlOnednnConvBackwardWeights"}
_lock = threading.Lock()
_state: dict = {}


class OnednnUnavailable(RuntimeError):
  """The oneDNN convolutions cannot be used here (the message says why and what to install)."""


def _prefixes():
  """Where pip puts the oneDNN wheels' lib/ and include/ ($CMEDL_ONEDNN_ROOT, the install schemes' data folders)."""
  found = [os.environ.get("CMEDL_ONEDNN_ROOT"), sysconfig.get_path("data"), sys.prefix, sys.base_prefix,
           site.getuserbase()]
  for scheme in ("posix_prefix", "posix_local", "posix_user"):
    try:
      found.append(sysconfig.get_path("data", scheme))
    except KeyError:  # a scheme this Python does not have
      pass
  return [p for i, p in enumerate(found) if p and p not in found[:i]]


def find_onednn():
  """(include dir, lib dir) of an installed oneDNN 3.x, or raises OnednnUnavailable."""
  for prefix in _prefixes():
    include, lib = os.path.join(prefix, "include"), os.path.join(prefix, "lib")
    if (os.path.exists(os.path.join(include, "oneapi", "dnnl", "dnnl.hpp"))
        and os.path.exists(os.path.join(lib, "libdnnl.so.3"))):
      return include, lib
  raise OnednnUnavailable(
      "oneDNN headers and libdnnl.so.3 not found under " + ", ".join(_prefixes())
      + "; install them with: pip install onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0 "
      "(x86-64 Linux), or set CMEDL_ONEDNN_ROOT to a folder with include/ and lib/")


# libdnnl from the gomp wheel runs on GNU OpenMP; -fopenmp of a GCC-compatible compiler links the same libgomp, so
# the handlers' omp_set_num_threads reaches oneDNN (clang's -fopenmp would bring a second OpenMP runtime).
_CXXFLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w")


def _compiler():
  for name in (os.environ.get("CXX"), "g++", "c++"):
    if name and shutil.which(name):
      return shutil.which(name)
  raise OnednnUnavailable("no C++ compiler found (g++ or c++; or set CXX to a GCC-compatible one) to build "
                          f"{SOURCE}; install one, e.g. apt-get install g++")


def library_path(cache_dir=None):
  """The cached library for this source, jaxlib and oneDNN; built by :func:`build` when missing."""
  include, lib = find_onednn()
  key = hashlib.sha256()
  for path in (SOURCE, *HEADERS):
    with open(path, "rb") as f:
      key.update(f.read())
  import jaxlib
  dnnl_mtime = os.path.getmtime(os.path.join(lib, "libdnnl.so.3"))
  key.update(f"{jaxlib.__version__}|{include}|{lib}|{dnnl_mtime}|{' '.join(_CXXFLAGS)}".encode())
  cache_dir = cache_dir or os.environ.get("CMEDL_ONEDNN_CACHE", DEFAULT_CACHE)
  return os.path.join(cache_dir, f"libcmedl_onednn_conv-{key.hexdigest()[:16]}.so")


def build(out_path):
  """Compiles the handlers into ``out_path`` (atomically: concurrent processes may build at once)."""
  include, lib = find_onednn()
  compiler = _compiler()
  folder = os.path.dirname(out_path)
  try:
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
  except OSError as e:
    raise OnednnUnavailable(f"cannot write the oneDNN library into {folder} ({e}); set CMEDL_ONEDNN_CACHE to a "
                            "writable folder") from e
  cmd = [compiler, *_CXXFLAGS, SOURCE, "-o", tmp, f"-I{include}", f"-I{jax.ffi.include_dir()}", f"-L{lib}", "-ldnnl",
         f"-Wl,-rpath,{lib}"]
  try:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
      raise OnednnUnavailable(f"building {SOURCE} failed (exit {result.returncode}):\n{' '.join(cmd)}\n"
                              f"{result.stderr[-3000:]}")
    os.replace(tmp, out_path)
  except OSError as e:
    raise OnednnUnavailable(f"building {SOURCE} into {out_path} failed: {e}") from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return out_path


def load():
  """Builds (first time on this machine) and registers the handlers; returns the library path.

  Raises:
    OnednnUnavailable: no oneDNN, no compiler, a failed build or a library that does not load.
  """
  with _lock:
    if "path" in _state:
      return _state["path"]
    if "error" in _state:
      raise OnednnUnavailable(_state["error"])
    try:
      path = library_path()
      if not os.path.exists(path):
        print(f"cmedl_jax: building the oneDNN convolutions (once per machine) into {path}", file=sys.stderr,
              flush=True)
        build(path)
      try:
        library = ctypes.cdll.LoadLibrary(path)
      except OSError as e:
        raise OnednnUnavailable(f"loading {path} failed: {e}") from e
      for target in _TARGETS.values():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)), platform="cpu")
    except OnednnUnavailable as e:
      _state["error"] = str(e)
      raise
    _state["library"], _state["path"] = library, path
    return path


def available() -> bool:
  """True when :func:`load` succeeds (builds the library on first use)."""
  try:
    load()
    return True
  except OnednnUnavailable:
    return False


def unavailable_reason() -> str:
  return _state.get("error", "")


def threads_per_call() -> int:
  """Threads per convolution (the library's pool, or an OpenMP team): this process's cores ($OMP_NUM_THREADS if set).

  Calls run one at a time; the count is read when a call is traced.
  """
  try:
    cores = int(os.environ.get("OMP_NUM_THREADS", "0")) or len(os.sched_getaffinity(0))
  except (ValueError, AttributeError):
    cores = os.cpu_count() or 1
  return max(1, cores)


def _attributes(stride, padding, dilation, winograd):
  (pt, pb), (pl, pr) = padding
  return dict(threads=np.int64(threads_per_call()), stride_h=np.int64(stride[0]), stride_w=np.int64(stride[1]),
              pad_top=np.int64(pt), pad_bottom=np.int64(pb), pad_left=np.int64(pl), pad_right=np.int64(pr),
              dilation_h=np.int64(dilation[0]), dilation_w=np.int64(dilation[1]), winograd=np.int64(bool(winograd)))


def winograd_applies(kernel_shape, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1)) -> bool:
  """Whether ``winograd=True`` changes this convolution's algorithm (the library checks the CPU for AVX2 + FMA too).

  3x3 kernels, stride 1, no dilation, top/left zero padding 0-2, input and output channels multiples of 8.
  """
  kh, kw, cin, cout = kernel_shape
  (pt, _), (pl, _) = padding
  return ((kh, kw) == (3, 3) and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1) and cin % 8 == 0
          and cout % 8 == 0 and 0 <= pt <= 2 and 0 <= pl <= 2)


def _call(kind, out):
  # Under vmap (e.g. the BatchNorm tests' vmapped axis) a loop over the mapped axis: correct, not fast.
  return jax.ffi.ffi_call(_TARGETS[kind], out, vmap_method="sequential")


def output_shape(x_shape, kernel_shape, stride, padding, dilation):
  """(N, H', W', out) of a convolution of an (N, H, W, in) input with a (kh, kw, in, out) kernel."""
  n, h, w, _ = x_shape
  kh, kw, _, cout = kernel_shape
  sizes = []
  for size, k, s, (lo, hi), d in ((h, kh, stride[0], padding[0], dilation[0]),
                                  (w, kw, stride[1], padding[1], dilation[1])):
    sizes.append((size + lo + hi - d * (k - 1) - 1) // s + 1)
  return (n, sizes[0], sizes[1], cout)


def conv_forward(x, kernel, *, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1),
                 winograd=False):
  """Zero-padded convolution, (N, H, W, in) x (kh, kw, in, out) -> (N, H', W', out); float32, CPU only.

  ``padding`` is ((top, bottom), (left, right)); results equal ``lax.conv_general_dilated`` with NHWC/HWIO
  dimension numbers up to float summation order.
  """
  load()
  out = jax.ShapeDtypeStruct(output_shape(x.shape, kernel.shape, stride, padding, dilation), x.dtype)
  return _call("forward", out)(x, kernel, **_attributes(stride, padding, dilation, winograd))


def conv_backward_data(g, kernel, x_shape, *, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1),
                       winograd=False):
  """Gradient of :func:`conv_forward` with respect to its (``x_shape``) input, given the output gradient ``g``."""
  load()
  out = jax.ShapeDtypeStruct(tuple(x_shape), g.dtype)
  return _call("backward_data", out)(g, kernel, **_attributes(stride, padding, dilation, winograd))


def conv_backward_weights(x, g, kernel_shape, *, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1),
                          winograd=False):
  """Gradient of :func:`conv_forward` with respect to its (kh, kw, in, out) kernel."""
  load()
  out = jax.ShapeDtypeStruct(tuple(kernel_shape), x.dtype)
  return _call("backward_weights", out)(x, g, **_attributes(stride, padding, dilation, winograd))


def profile_start():
  """Starts timing every oneDNN call of this process, per kind and geometry (:func:`profile_stop` reads it)."""
  load()
  _state["library"].CmedlOnednnProfileStart()


def profile_stop():
  """Stops timing the calls and returns what was measured since :func:`profile_start`.

  Returns:
    dict with ``calls``: {"fwd|dx|dw n<N> <H>x<W>x<in> -> <H'>x<W'>x<out> k<kh>x<kw> s<stride>": (calls,
    seconds)}, ``busy_s``: wall seconds with a call running, ``threads``: OS threads the calls ran on (1: the
    executor).
  """
  load()
  library = _state["library"]
  library.CmedlOnednnProfileStop.restype = ctypes.c_int64
  size = 1 << 16
  while True:
    buffer = ctypes.create_string_buffer(size)
    needed = library.CmedlOnednnProfileStop(buffer, ctypes.c_int64(size))
    if needed < size:
      break
    size = needed + 1  # the stop is idempotent: read the same table again into a larger buffer
  calls, busy, threads = {}, 0.0, 0
  for line in buffer.value.decode().splitlines():
    if line.startswith("busy "):
      _, busy, threads = line.split()
    else:
      count, seconds, key = line.split(" ", 2)
      calls[key] = (int(count), float(seconds))
  return {"calls": calls, "busy_s": float(busy), "threads": int(threads)}
