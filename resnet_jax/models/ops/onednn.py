"""oneDNN's CPU convolutions (the kernels PyTorch runs on CPUs), called through ctypes.

XLA:CPU computes a convolution's weight gradient as two layout transposes around a
convolution whose kernel is the whole feature map (22.5 ms for a 3x3 convolution on a
32x32x16 map at batch 128 on a 2-core Xeon, where oneDNN takes 3.8 ms), and its forward and
input-gradient passes at about half oneDNN's speed on 7x7 to 32x32 maps. This module runs
the three directions of an NHWC/HWIO float32 convolution with oneDNN, from the registry
wheel `onednn-cpu-gomp` (the shared library, no Python code; a dependency on x86-64
Linux), as steps of the compiled program: each (direction, shape) is an XLA FFI target
whose handler is a ctypes function, so oneDNN reads and writes XLA's own buffers.
(`jax.pure_callback` would copy every operand and result, about 1.4 ms per call on 8 MB
maps: oneDNN itself took 132 ms of the 358 ms cifar_resnet20 step that gave.)

Nothing here is required: `available()` is False where the library is missing or does not
load (another platform, no libgomp), and `supports()` is False for a convolution oneDNN
refuses; `conv_impl=auto` then keeps XLA's lowerings.

oneDNN reads the NHWC activations and HWIO kernels where they are (strided memory
descriptors); only the small kernel is reordered into the blocked layout its chosen
implementation wants. Primitives are created once per convolution shape and
direction and kept for the process. Calls are serialized by a lock: a oneDNN stream runs
one primitive at a time, and oneDNN already spreads one call over every core (OpenMP).
"""

import atexit
import contextlib
import ctypes
import ctypes.util
import functools
import importlib.metadata
import os
import pathlib
import threading
import time
import traceback
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np

# ABI constants of oneDNN v3 (oneapi/dnnl/dnnl_types.h, dnnl_common_types.h).
_CPU_ENGINE, _IN_ORDER_STREAM = 1, 1
_F32, _FORMAT_ANY = 3, 1
_FORWARD_TRAINING, _CONVOLUTION_DIRECT = 64, 1
_QUERY_IMPL_INFO, _QUERY_EXEC_ARG_MD = 8, 255
_SRC, _DST, _WEIGHTS, _SCRATCHPAD = 1, 17, 33, 80
_DIFF_SRC, _DIFF_DST, _DIFF_WEIGHTS = 129, 145, 161

_USER_SCRATCHPAD = 1  # dnnl_scratchpad_mode_user
_ALIGNMENT = 64  # bytes, of the scratchpad (a cache line, what oneDNN's own allocator gives)
_Dims = ctypes.c_int64 * 12  # dnnl_dims_t
_Handle = ctypes.c_void_p
DISABLE_ENV = 'RESNET_JAX_ONEDNN'  # set to 0 to keep oneDNN out of conv_impl=auto
DIRECTIONS = ('forward', 'input_grad', 'weight_grad')


class OneDnnError(RuntimeError):
  """A oneDNN call returned an error status."""


class Shape(NamedTuple):
  """A convolution's static shape: input (N, H, W, C), kernel (KH, KW, C, F), strides and
  (low, high) padding per spatial axis; conv_lowering.Geometry has these fields."""

  x_shape: tuple[int, int, int, int]
  w_shape: tuple[int, int, int, int]
  strides: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]

  @property
  def y_shape(self) -> tuple[int, int, int, int]:
    (n, h, w, _), (kh, kw, _, f) = self.x_shape, self.w_shape
    oh, ow = (
      (size + lo + hi - k) // s + 1
      for size, k, s, (lo, hi) in zip((h, w), (kh, kw), self.strides, self.padding, strict=True)
    )
    return (n, oh, ow, f)


# --- The library -----------------------------------------------------------------------


def _library_paths() -> list[str]:
  """Where libdnnl may be: the onednn-cpu-gomp wheel's file, then the system's."""
  paths = []
  try:
    for file in importlib.metadata.files('onednn-cpu-gomp') or ():
      if file.name.startswith('libdnnl.so'):
        paths.append(str(pathlib.Path(file.locate()).resolve()))
  except importlib.metadata.PackageNotFoundError:
    pass
  found = ctypes.util.find_library('dnnl')
  return sorted(paths, key=len) + ([found] if found else [])


class _Version(ctypes.Structure):  # dnnl_version_t
  _fields_ = (
    ('major', ctypes.c_int),
    ('minor', ctypes.c_int),
    ('patch', ctypes.c_int),
    ('hash', ctypes.c_char_p),
    ('cpu_runtime', ctypes.c_uint),
    ('gpu_runtime', ctypes.c_uint),
  )


# The oneDNN releases whose C API the constants, signatures and structs here follow:
# v3.x (the onednn-cpu-gomp 2023.x wheels). Any other library is not used.
SUPPORTED = ((3, 0), (4, 0))  # [from, to)


def _load(path: str) -> ctypes.CDLL | None:
  """The library at `path`, if it loads and is a supported release."""
  try:
    lib = ctypes.CDLL(path)
  except OSError:
    return None
  lib.dnnl_version.restype = ctypes.POINTER(_Version)
  release = lib.dnnl_version().contents
  if not SUPPORTED[0] <= (release.major, release.minor) < SUPPORTED[1]:
    return None
  lib.dnnl_primitive_desc_query_md.restype = _Handle
  lib.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
  return lib


@functools.cache
def _library() -> ctypes.CDLL | None:
  if os.environ.get(DISABLE_ENV, '1') == '0':
    return None
  return next(filter(None, map(_load, _library_paths())), None)


def effective_isa() -> str | None:
  """The instruction set oneDNN's kernels use here (its dnnl_cpu_isa_t value, in hex):
  the CPU's, or less under ONEDNN_MAX_CPU_ISA."""
  lib = _library()
  return None if lib is None else hex(lib.dnnl_get_effective_cpu_isa())


def version() -> str | None:
  """The loaded oneDNN's release (e.g. '3.2.0'), None where it does not load."""
  lib = _library()
  if lib is None:
    return None
  release = lib.dnnl_version().contents
  return f'{release.major}.{release.minor}.{release.patch}'


def available() -> bool:
  """Whether oneDNN's library is installed and loads here."""
  return _library() is not None


def _check(status: int, what: str) -> None:
  if status != 0:
    raise OneDnnError(f'oneDNN {what} failed with status {status}')


class _ExecArg(ctypes.Structure):
  _fields_ = (('arg', ctypes.c_int), ('memory', _Handle))


class _Primitive(NamedTuple):
  handle: _Handle
  scratchpad: _Handle | None  # memory object of its scratchpad; None where it needs none
  scratchpad_bytes: int


class _Runtime:
  """The CPU engine, one in-order stream and one scratchpad, for the process.

  Every primitive is created with a user-managed scratchpad. In oneDNN's default mode
  (`library`) a primitive keeps its scratchpad per thread and may run only on the thread
  that created it; ours are created while jax traces (a Python thread) and run on XLA's
  worker threads, and the kernels that use a scratchpad (the gemm-based ones oneDNN
  picks on AVX2 and SSE4.1 CPUs) crashed there. One buffer serves every primitive, since
  `lock` serializes their runs.
  """

  def __init__(self, lib: ctypes.CDLL):
    self.lib = lib
    self.engine, self.stream, self.attr = _Handle(), _Handle(), _Handle()
    _check(
      lib.dnnl_engine_create(ctypes.byref(self.engine), _CPU_ENGINE, ctypes.c_size_t(0)), 'engine'
    )
    _check(
      lib.dnnl_stream_create(ctypes.byref(self.stream), self.engine, _IN_ORDER_STREAM), 'stream'
    )
    _check(lib.dnnl_primitive_attr_create(ctypes.byref(self.attr)), 'attributes')
    _check(
      lib.dnnl_primitive_attr_set_scratchpad_mode(self.attr, _USER_SCRATCHPAD), 'scratchpad mode'
    )
    self.lock = threading.Lock()
    self._scratchpad = np.empty(0, np.uint8)

  def strided(self, dims: Sequence[int], strides: Sequence[int]) -> _Handle:
    md = _Handle()
    _check(
      self.lib.dnnl_memory_desc_create_with_strides(
        ctypes.byref(md), len(dims), _Dims(*dims), _F32, _Dims(*strides)
      ),
      'memory descriptor',
    )
    return md

  def any_layout(self, dims: Sequence[int]) -> _Handle:
    md = _Handle()
    _check(
      self.lib.dnnl_memory_desc_create_with_tag(
        ctypes.byref(md), len(dims), _Dims(*dims), _F32, _FORMAT_ANY
      ),
      'memory descriptor',
    )
    return md

  def arg_md(self, pd: _Handle, arg: int) -> _Handle:
    """The memory descriptor of execution argument `arg` of primitive descriptor `pd`."""
    return _Handle(self.lib.dnnl_primitive_desc_query_md(pd, _QUERY_EXEC_ARG_MD, arg))

  def primitive(self, pd: _Handle) -> _Primitive:
    prim = _Handle()
    _check(self.lib.dnnl_primitive_create(ctypes.byref(prim), pd), 'primitive')
    md = self.arg_md(pd, _SCRATCHPAD)
    size = self.lib.dnnl_memory_desc_get_size(md) if md else 0
    return _Primitive(prim, self.memory(md) if size else None, size)

  def memory(self, md: _Handle) -> _Handle:
    mem = _Handle()
    _check(self.lib.dnnl_memory_create(ctypes.byref(mem), md, self.engine, None), 'memory')
    return mem

  def reorder(self, src: _Handle, dst: _Handle) -> _Primitive:
    pd = _Handle()
    _check(
      self.lib.dnnl_reorder_primitive_desc_create(
        ctypes.byref(pd), src, self.engine, dst, self.engine, self.attr
      ),
      'reorder',
    )
    return self.primitive(pd)

  def execute(self, prim: _Primitive, args: Sequence[tuple[int, _Handle, int]]) -> None:
    """Runs `prim` on (argument kind, memory object, data address) triples. The caller
    holds `lock`: the scratchpad is shared."""
    if prim.scratchpad is not None:
      scratchpad = self._scratchpad_address(prim.scratchpad_bytes)
      args = [*args, (_SCRATCHPAD, prim.scratchpad, scratchpad)]
    for _, mem, address in args:
      _check(self.lib.dnnl_memory_set_data_handle(mem, _Handle(address)), 'data handle')
    packed = (_ExecArg * len(args))(*(_ExecArg(kind, mem) for kind, mem, _ in args))
    _check(self.lib.dnnl_primitive_execute(prim.handle, self.stream, len(args), packed), 'execute')
    _check(self.lib.dnnl_stream_wait(self.stream), 'stream wait')

  def _scratchpad_address(self, size: int) -> int:
    """A 64-byte-aligned address of at least `size` bytes of the shared scratchpad, grown
    to the largest size asked for (under `lock`, so no run is using it meanwhile)."""
    if self._scratchpad.size < size + _ALIGNMENT:
      self._scratchpad = np.empty(size + _ALIGNMENT, np.uint8)
    address = self._scratchpad.ctypes.data
    return address + (-address) % _ALIGNMENT


@functools.cache
def _runtime() -> _Runtime:
  lib = _library()
  if lib is None:
    raise OneDnnError('oneDNN is not installed: pip install onednn-cpu-gomp')
  return _Runtime(lib)


class _Direction(NamedTuple):
  primitive: _Primitive
  kernel: _Handle  # memory object of the kernel (or its gradient) in the primitive's layout
  blocked: np.ndarray  # that kernel's storage
  reorder: _Primitive  # user HWIO -> blocked (forward, input gradient) or back (weight gradient)


class _Convolution:
  """The three primitives of one convolution shape, with the memory objects they use."""

  def __init__(self, rt: _Runtime, shape: Shape):
    (n, h, w, c), (kh, kw, _, f) = shape.x_shape, shape.w_shape
    _, oh, ow, _ = shape.y_shape
    self.rt = rt
    # Logical dims are oneDNN's (N, C, H, W) and (O, I, KH, KW); strides say NHWC / HWIO.
    x_md = rt.strided((n, c, h, w), (h * w * c, 1, w * c, c))
    y_md = rt.strided((n, f, oh, ow), (oh * ow * f, 1, ow * f, f))
    self.w_user = rt.strided((f, c, kh, kw), (1, f, kw * c * f, c * f))
    w_any = rt.any_layout((f, c, kh, kw))
    geometry = (
      _Dims(*shape.strides),
      _Dims(0, 0),  # oneDNN's dilation 0 is none
      _Dims(*(lo for lo, _ in shape.padding)),
      _Dims(*(hi for _, hi in shape.padding)),
    )
    lib = rt.lib
    fwd, bwd_data, bwd_weights = _Handle(), _Handle(), _Handle()
    _check(
      lib.dnnl_convolution_forward_primitive_desc_create(
        ctypes.byref(fwd), rt.engine, _FORWARD_TRAINING, _CONVOLUTION_DIRECT,
        x_md, w_any, None, y_md, *geometry, rt.attr,
      ),
      'forward convolution',
    )  # fmt: skip
    _check(
      lib.dnnl_convolution_backward_data_primitive_desc_create(
        ctypes.byref(bwd_data), rt.engine, _CONVOLUTION_DIRECT,
        x_md, w_any, y_md, *geometry, fwd, rt.attr,
      ),
      'input-gradient convolution',
    )  # fmt: skip
    _check(
      lib.dnnl_convolution_backward_weights_primitive_desc_create(
        ctypes.byref(bwd_weights), rt.engine, _CONVOLUTION_DIRECT,
        x_md, w_any, None, y_md, *geometry, fwd, rt.attr,
      ),
      'weight-gradient convolution',
    )  # fmt: skip
    pds = dict(zip(DIRECTIONS, (fwd, bwd_data, bwd_weights), strict=True))
    self.impl = {d: _impl_info(lib, pd) for d, pd in pds.items()}
    self.forward = self._direction(fwd, _WEIGHTS, into_primitive=True)
    self.input_grad = self._direction(bwd_data, _WEIGHTS, into_primitive=True)
    self.weight_grad = self._direction(bwd_weights, _DIFF_WEIGHTS, into_primitive=False)
    self.x, self.y = rt.memory(x_md), rt.memory(y_md)
    self.w = rt.memory(self.w_user)

  def _direction(self, pd: _Handle, kernel_arg: int, into_primitive: bool) -> _Direction:
    rt = self.rt
    md = rt.arg_md(pd, kernel_arg)
    blocked = np.empty(rt.lib.dnnl_memory_desc_get_size(md) // 4, np.float32)
    src, dst = (self.w_user, md) if into_primitive else (md, self.w_user)
    return _Direction(rt.primitive(pd), rt.memory(md), blocked, rt.reorder(src, dst))

  def run(self, direction: str, a: int, b: int, out: int) -> None:
    """One direction on data addresses: forward (x, w) -> y, input_grad (dy, w) -> dx,
    weight_grad (x, dy) -> dw. Safe from any thread: runs are serialized."""
    with self.rt.lock:
      self._run(direction, a, b, out)

  def _run(self, direction: str, a: int, b: int, out: int) -> None:
    d, rt = getattr(self, direction), self.rt
    blocked = d.blocked.ctypes.data
    if direction == 'weight_grad':
      rt.execute(
        d.primitive, [(_SRC, self.x, a), (_DIFF_DST, self.y, b), (_DIFF_WEIGHTS, d.kernel, blocked)]
      )
      rt.execute(d.reorder, [(_SRC, d.kernel, blocked), (_DST, self.w, out)])
      return
    rt.execute(d.reorder, [(_SRC, self.w, b), (_DST, d.kernel, blocked)])
    if direction == 'forward':
      rt.execute(
        d.primitive, [(_SRC, self.x, a), (_WEIGHTS, d.kernel, blocked), (_DST, self.y, out)]
      )
    else:
      rt.execute(
        d.primitive,
        [(_DIFF_DST, self.y, a), (_WEIGHTS, d.kernel, blocked), (_DIFF_SRC, self.x, out)],
      )


def _impl_info(lib: ctypes.CDLL, pd: _Handle) -> str:
  info = ctypes.c_char_p()
  _check(lib.dnnl_primitive_desc_query(pd, _QUERY_IMPL_INFO, 0, ctypes.byref(info)), 'query')
  return info.value.decode()


@functools.cache
def convolution(shape: Shape) -> _Convolution:
  """The three primitives of `shape`, created on first use and kept for the process."""
  return _Convolution(_runtime(), shape)


@functools.cache
def supports(shape: Shape) -> bool:
  """Whether oneDNN is available and creates all three primitives for `shape`."""
  if not available():
    return False
  try:
    convolution(Shape(*shape))
  except OneDnnError:
    return False
  return True


def implementations(shape: Shape) -> dict[str, str]:
  """oneDNN's implementation name per direction (e.g. 'brgconv:avx512_core')."""
  return dict(convolution(Shape(*shape)).impl)


# --- XLA FFI handlers (xla/ffi/api/c_api.h, FFI API 0.x) -------------------------------


class _ApiVersion(ctypes.Structure):
  _fields_ = (
    ('struct_size', ctypes.c_size_t),
    ('extension_start', _Handle),
    ('major_version', ctypes.c_int),
    ('minor_version', ctypes.c_int),
  )


class _Metadata(ctypes.Structure):
  _fields_ = (
    ('struct_size', ctypes.c_size_t),
    ('api_version', _ApiVersion),
    ('traits', ctypes.c_uint32),
    ('state_type_id', ctypes.c_int64),
  )


class _ExtensionBase(ctypes.Structure):
  _fields_ = (('struct_size', ctypes.c_size_t), ('type', ctypes.c_int), ('next', _Handle))


class _MetadataExtension(ctypes.Structure):
  _fields_ = (('extension_base', _ExtensionBase), ('metadata', ctypes.POINTER(_Metadata)))


class _Buffer(ctypes.Structure):
  _fields_ = (
    ('struct_size', ctypes.c_size_t),
    ('extension_start', _Handle),
    ('dtype', ctypes.c_int),
    ('data', _Handle),
    ('rank', ctypes.c_int64),
    ('dims', ctypes.POINTER(ctypes.c_int64)),
  )


class _Values(ctypes.Structure):  # XLA_FFI_Args and XLA_FFI_Rets
  _fields_ = (
    ('struct_size', ctypes.c_size_t),
    ('extension_start', _Handle),
    ('size', ctypes.c_int64),
    ('types', ctypes.POINTER(ctypes.c_int)),
    ('values', ctypes.POINTER(ctypes.POINTER(_Buffer))),
  )


class _Attrs(ctypes.Structure):
  _fields_ = (
    ('struct_size', ctypes.c_size_t),
    ('extension_start', _Handle),
    ('size', ctypes.c_int64),
    ('types', _Handle),
    ('names', _Handle),
    ('attrs', _Handle),
  )


class _CallFrame(ctypes.Structure):
  _fields_ = (
    ('struct_size', ctypes.c_size_t),
    ('extension_start', ctypes.POINTER(_ExtensionBase)),
    ('api', _Handle),
    ('ctx', _Handle),
    ('stage', ctypes.c_int),
    ('args', _Values),
    ('rets', _Values),
    ('attrs', _Attrs),
    ('future', _Handle),
  )


class _ErrorCreateArgs(ctypes.Structure):
  _fields_ = (
    ('struct_size', ctypes.c_size_t),
    ('extension_start', _Handle),
    ('message', ctypes.c_char_p),
    ('errc', ctypes.c_int),
  )


_FFI_API_VERSION = (0, 1)  # the oldest FFI API these structs match
_METADATA_EXTENSION, _EXECUTE_STAGE, _ERROR_INTERNAL = 1, 3, 13
_ERROR_CREATE = ctypes.CFUNCTYPE(_Handle, ctypes.POINTER(_ErrorCreateArgs))
_ERROR_CREATE_OFFSET = 48  # XLA_FFI_Api: struct_size, extension_start, api_version, internal_api
_Handler = ctypes.CFUNCTYPE(_Handle, ctypes.POINTER(_CallFrame))
_handlers: dict[str, _Handler] = {}  # registered targets; ctypes functions must stay alive


def _error(api: int, message: str) -> int:
  create = _ERROR_CREATE(ctypes.c_void_p.from_address(api + _ERROR_CREATE_OFFSET).value)
  args = _ErrorCreateArgs(ctypes.sizeof(_ErrorCreateArgs), None, message.encode(), _ERROR_INTERNAL)
  return create(ctypes.byref(args))


class _Activity:
  """When oneDNN steps ran, so that the process's exit can wait for the ones still coming.

  A handler is Python and needs the GIL. A program still running when the interpreter
  finalizes (a script that exits without waiting for its last result) would call one
  while the finalizing main thread holds the GIL and waits, in XLA's client destructor,
  for that very worker thread: a hang at exit. So at exit (`atexit`, before finalization)
  the main thread waits, GIL released, for every live array, then until no step has run
  for `QUIET_S` (a result that was dropped still has its program running).
  """

  QUIET_S = 0.5  # longer than XLA's work between two convolutions of a step
  MAX_WAIT_S = 600.0

  def __init__(self):
    self.lock = threading.Lock()
    self.running, self.last = 0, time.monotonic()

  def __enter__(self):
    with self.lock:
      self.running += 1

  def __exit__(self, *_):
    with self.lock:
      self.running -= 1
      self.last = time.monotonic()

  def wait_for_programs(self) -> None:
    for array in jax.live_arrays():
      with contextlib.suppress(Exception):  # a failed program has nothing left to run
        array.block_until_ready()
    start = time.monotonic()
    while time.monotonic() < start + self.MAX_WAIT_S:
      with self.lock:
        if not self.running and time.monotonic() - max(self.last, start) > self.QUIET_S:
          return
      time.sleep(0.05)


_activity = _Activity()


def _handler(conv: _Convolution, direction: str) -> _Handler:
  def handle(frame_ptr) -> int | None:
    frame = frame_ptr.contents
    if frame.extension_start and frame.extension_start.contents.type == _METADATA_EXTENSION:
      ext = ctypes.cast(frame.extension_start, ctypes.POINTER(_MetadataExtension)).contents
      major, minor = _FFI_API_VERSION
      ext.metadata.contents.api_version = _ApiVersion(
        ctypes.sizeof(_ApiVersion), None, major, minor
      )
      ext.metadata.contents.traits = 0
      return None
    try:
      if frame.stage != _EXECUTE_STAGE:
        return None
      args, rets = frame.args.values, frame.rets.values
      with _activity:
        conv.run(direction, args[0].contents.data, args[1].contents.data, rets[0].contents.data)
    except Exception:  # noqa: BLE001 -- reported to XLA, which raises it in the caller
      return _error(frame.api, f'resnet_jax oneDNN {direction}: {traceback.format_exc()}')
    return None

  return _Handler(handle)


def _target(direction: str, shape: Shape) -> str:
  """The FFI target computing `direction` for `shape`, registered on first use."""
  (n, h, w, c), (kh, kw, _, f) = shape.x_shape, shape.w_shape
  (sh, sw), ((t, b), (left, r)) = shape.strides, shape.padding
  name = (
    f'resnet_jax_onednn_{direction}_{n}x{h}x{w}x{c}_{kh}x{kw}x{f}_s{sh}x{sw}_p{t}_{b}_{left}_{r}'
  )
  if name not in _handlers:
    if not _handlers:
      atexit.register(_activity.wait_for_programs)
    _handlers[name] = _handler(convolution(shape), direction)
    fn = ctypes.cast(_handlers[name], _Handle).value
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(fn), platform='cpu')
  return name


def call(direction: str, shape: Shape, a: jax.Array, b: jax.Array) -> jax.Array:
  """One direction of the convolution of `shape` (float32) in a jax program: forward
  (x, w) -> y, input_grad (dy, w) -> dx, weight_grad (x, dy) -> dw."""
  shape = Shape(*shape)
  out = {'forward': shape.y_shape, 'input_grad': shape.x_shape, 'weight_grad': shape.w_shape}
  result = jax.ShapeDtypeStruct(out[direction], np.float32)
  return jax.ffi.ffi_call(_target(direction, shape), result, vmap_method='sequential')(a, b)
