"""resnet_jax.models.ops.conv_lowering: every formulation of every direction (oneDNN's
included) computes XLA's convolution within float32 rounding, the model's conv_impl switch
changes nothing but speed, and `auto` reads its table only on CPUs."""

import functools
import json
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import models, sharding
from resnet_jax.errors import UserError
from resnet_jax.models.ops import conv_lowering as cl
from resnet_jax.models.ops import onednn, onednn_check
from tests.helpers import run_python

# (input NHWC, kernel HWIO, strides, padding): strides 1 and 2, the 7x7/2 stem, 1x1
# projections, odd and non-square maps, 1 and 3 input channels, batch 1, maps where taps
# only see padding (1x1 and 2x2 under a 3x3 kernel).
SHAPES = {
  '3x3_s1': ((2, 8, 8, 3), (3, 3, 3, 5), (1, 1), ((1, 1), (1, 1))),
  '3x3_s2': ((2, 8, 8, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1))),
  '3x3_s2_odd_nonsquare': ((2, 7, 5, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1))),
  '3x3_on_1x1_batch1': ((1, 1, 1, 8), (3, 3, 8, 4), (1, 1), ((1, 1), (1, 1))),
  '3x3_on_2x2': ((1, 2, 2, 8), (3, 3, 8, 4), (1, 1), ((1, 1), (1, 1))),
  '3x3_s2_on_2x2': ((2, 2, 2, 8), (3, 3, 8, 4), (2, 2), ((1, 1), (1, 1))),
  'stem_7x7_s2_1ch': ((2, 28, 28, 1), (7, 7, 1, 8), (2, 2), ((3, 3), (3, 3))),
  'stem_7x7_s2_3ch_odd': ((1, 15, 15, 3), (7, 7, 3, 4), (2, 2), ((3, 3), (3, 3))),
  'proj_1x1_s2': ((2, 7, 7, 6), (1, 1, 6, 8), (2, 2), ((0, 0), (0, 0))),
  'proj_1x1_s1': ((2, 9, 9, 3), (1, 1, 3, 4), (1, 1), ((0, 0), (0, 0))),
}
# The directions are computed independently, so each formulation of each is tested beside
# XLA's for the other two.
LOWERINGS = [
  cl.XLA._replace(**{direction: name})
  for direction, options in (
    ('forward', cl.FORWARD),
    ('input_grad', cl.INPUT_GRAD),
    ('weight_grad', cl.WEIGHT_GRAD),
  )
  for name in options
  if name != 'xla'
]
X86_LINUX = platform.system() == 'Linux' and platform.machine() == 'x86_64'


@pytest.mark.parametrize('shape', SHAPES, ids=str)
def test_every_lowering_equals_xla_within_rounding(shape):
  case = _case(shape)
  for lowering in LOWERINGS:
    if 'onednn' not in lowering:  # test_onednn_equals_xla_within_rounding
      _assert_within(lowering, *case)


@pytest.mark.onednn
@pytest.mark.skipif(not onednn.available(), reason='oneDNN does not load here')
@pytest.mark.parametrize('shape', SHAPES, ids=str)
def test_onednn_equals_xla_within_rounding(shape):
  _assert_within(cl.ONEDNN, *_case(shape))


def _case(shape):
  """SHAPES[shape]'s geometry, random x, w and dy, XLA's y, dx, dw and their bounds."""
  xs, ws, strides, padding = SHAPES[shape]
  kx, kw, kd = jax.random.split(jax.random.key(0), 3)
  x, w = jax.random.normal(kx, xs), jax.random.normal(kw, ws)
  g = cl.Geometry(xs, ws, strides, padding)
  dy = jax.random.normal(kd, (xs[0], *g.out_hw, ws[3]))
  return g, x, w, dy, *onednn_check.rounding_bounds(x, w, dy, strides, padding)


def _assert_within(lowering, g, x, w, dy, want, bounds):
  """`lowering`'s y, dx and dw equal XLA's `want` within the rounding `bounds`."""

  @jax.jit
  def conv_and_grads(x, w, dy):
    y, vjp = jax.vjp(lambda x, w: cl.lowered_conv(x, w, g, lowering), x, w)
    return (y, *vjp(dy))

  got_all = conv_and_grads(x, w, dy)
  for name, got, ref, bound in zip(('y', 'dx', 'dw'), got_all, want, bounds, strict=True):
    assert got.shape == ref.shape and got.dtype == ref.dtype
    excess = float(jnp.max(jnp.abs(got - ref) / bound))
    assert excess <= 1.0, f'{lowering} {name}: error {excess:.2f}x the rounding bound'


def test_dead_taps_are_dropped():
  assert cl.Geometry((1, 1, 1, 8), (3, 3, 8, 4), (1, 1), ((1, 1), (1, 1))).taps() == [(1, 1)]
  two = cl.Geometry((1, 2, 2, 8), (3, 3, 8, 4), (2, 2), ((1, 1), (1, 1)))
  assert two.out_hw == (1, 1) and two.taps() == [(1, 1), (1, 2), (2, 1), (2, 2)]
  assert len(cl.Geometry((1, 8, 8, 3), (3, 3, 3, 4), (1, 1), ((1, 1), (1, 1))).taps()) == 9


def _table(monkeypatch, choices, with_onednn=None, cpu=None):
  table = cl.Table(choices, with_onednn or {}, cpu or cl.cpu_model())
  monkeypatch.setattr(cl, 'measured_table', lambda: table)


def test_auto_reads_the_table_on_cpu_only(monkeypatch):
  monkeypatch.setattr(onednn_check, 'trusted', lambda: False)  # the table among XLA's only
  g = cl.Geometry((128, 1, 1, 512), (3, 3, 512, 512), (1, 1), ((1, 1), (1, 1)))
  _table(monkeypatch, {g.key(jnp.float32): {'forward': 'gemm', 'input_grad': 'gemm'}})
  assert cl.choose(g, jnp.float32, 'auto') == cl.Lowering('gemm', 'gemm', 'xla')
  unmeasured = g._replace(x_shape=(128, 3, 3, 512))
  assert cl.choose(unmeasured, jnp.float32, 'auto') == cl.XLA
  assert cl.choose(g, jnp.bfloat16, 'auto') == cl.XLA  # measured in float32 only
  assert cl.choose(g, jnp.float32, 'taps') == cl.Lowering('taps', 'taps', 'taps')
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert cl.choose(g, jnp.float32, 'auto') == cl.XLA


def test_on_another_cpu_auto_keeps_only_the_dead_tap_choices(monkeypatch):
  centre = cl.Geometry((128, 1, 1, 512), (3, 3, 512, 512), (1, 1), ((1, 1), (1, 1)))
  full = cl.Geometry((128, 8, 8, 64), (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1)))
  assert centre.has_dead_taps() and not full.has_dead_taps()
  taps = {'forward': 'taps', 'input_grad': 'taps', 'weight_grad': 'taps'}
  table = {g.key(jnp.float32): taps for g in (centre, full)}
  _table(monkeypatch, table, table, cpu='Some Other CPU @ 2.0GHz')
  monkeypatch.setattr(onednn, 'available', lambda: False)
  onednn.supports.cache_clear()
  try:
    assert cl.choose(centre, jnp.float32, 'auto') == cl.Lowering('taps', 'taps', 'taps')
    assert cl.choose(full, jnp.float32, 'auto') == cl.XLA
  finally:
    onednn.supports.cache_clear()


@pytest.mark.onednn
def test_onednn_loads_where_it_is_a_dependency():
  if not X86_LINUX:
    pytest.skip('onednn-cpu-gomp is installed on x86-64 Linux only')
  assert onednn.available(), 'pip install onednn-cpu-gomp (a dependency here) did not load'
  g = onednn.Shape((4, 8, 8, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1)))
  assert onednn.supports(g) and set(onednn.implementations(g)) == set(onednn.DIRECTIONS)


@pytest.mark.onednn
@pytest.mark.skipif(not onednn.available(), reason='oneDNN does not load here')
@pytest.mark.parametrize('shape', onednn_check.SHAPES, ids=lambda s: 'x'.join(map(str, s.x_shape)))
def test_onednn_created_on_one_thread_runs_on_another(shape):
  """XLA runs each FFI step on a worker thread, not the thread that traced the program and
  created the primitives. Where oneDNN kept a primitive's scratchpad per thread, the
  gemm-based kernels it picks for 3x3 convolutions on 1x1 and 2x2 maps on AVX2 and SSE4.1
  (ONEDNN_MAX_CPU_ISA; tests/run.py runs this file under both) crashed the process there."""
  onednn_check.compare(shape)  # raises where a direction is off XLA's by more than rounding


@pytest.mark.onednn
def test_onednn_passes_its_check_here(monkeypatch, tmp_path):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  onednn_check.trusted.cache_clear()
  try:
    assert onednn_check.trusted() == onednn.available()
  finally:
    onednn_check.trusted.cache_clear()
  if onednn.available():  # the verdict is cached for this CPU, release and ISA
    (verdict,) = (tmp_path / 'resnet_jax').iterdir()
    assert json.loads(verdict.read_text()) == {**onednn_check._key(), 'ok': True, 'why': ''}


@pytest.mark.onednn
@pytest.mark.skipif(not onednn.available(), reason='oneDNN does not load here')
def test_a_crashing_check_means_xla_with_one_warning_line(monkeypatch, tmp_path, caplog):
  """A oneDNN that takes its process down (here: a child that segfaults) costs a warning
  and XLA's lowerings, once: the verdict is cached and the check does not run again."""
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  crash = [sys.executable, '-c', 'import os, signal; os.kill(os.getpid(), signal.SIGSEGV)']
  monkeypatch.setattr(onednn_check, '_child_command', lambda: crash)
  monkeypatch.setattr(jax, 'device_count', lambda: 1)
  full = cl.Geometry((128, 8, 8, 64), (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1)))
  _table(monkeypatch, {}, cpu='Some Other CPU')
  onednn_check.trusted.cache_clear()
  try:
    with caplog.at_level('WARNING'):
      assert cl.choose(full, jnp.float32, 'auto') == cl.XLA
    (warning,) = [r.getMessage() for r in caplog.records]
    assert 'oneDNN failed its check on this CPU (the check exited with signal SIGSEGV)' in warning
    assert '\n' not in warning
    monkeypatch.setattr(onednn_check, '_child_command', lambda: pytest.fail('checked again'))
    onednn_check.trusted.cache_clear()
    assert not onednn_check.trusted()  # from the cached verdict
    assert cl.choose(full, jnp.float32, 'onednn') == cl.ONEDNN  # asked for: runs anyway
  finally:
    onednn_check.trusted.cache_clear()


@pytest.mark.onednn
def test_onednn_of_another_release_is_not_used(monkeypatch):
  """The constants and signatures are oneDNN 3.x's: a library of another major release
  (a system libdnnl found by name, say) is not loaded."""
  if not X86_LINUX:
    pytest.skip('onednn-cpu-gomp is installed on x86-64 Linux only')
  path = onednn._library_paths()[0]
  assert onednn._load(path) is not None and onednn.version().startswith('3.')
  monkeypatch.setattr(onednn, 'SUPPORTED', ((4, 0), (5, 0)))
  assert onednn._load(path) is None


@pytest.mark.onednn
@pytest.mark.mesh
@pytest.mark.skipif(not onednn.available(), reason='oneDNN does not load here')
def test_auto_takes_onednn_on_one_device_and_the_table_where_it_measured(monkeypatch):
  full = cl.Geometry((128, 8, 8, 64), (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1)))
  centre = cl.Geometry((128, 1, 1, 512), (3, 3, 512, 512), (1, 1), ((1, 1), (1, 1)))
  taps = cl.Lowering('taps', 'taps', 'taps')
  measured = cl.Lowering('onednn', 'gemm', 'onednn')
  monkeypatch.setattr(jax, 'device_count', lambda: 1)
  # Another CPU: oneDNN for a shape without dead taps, the table for one with them.
  _table(monkeypatch, {centre.key(jnp.float32): taps._asdict()}, cpu='Some Other CPU')
  assert cl.choose(full, jnp.float32, 'auto') == cl.ONEDNN
  assert cl.choose(centre, jnp.float32, 'auto') == taps
  assert cl.choose(full, jnp.bfloat16, 'auto') == cl.XLA  # oneDNN runs float32 only here
  # The measuring CPU: the table's choice with oneDNN as a candidate.
  _table(
    monkeypatch,
    {full.key(jnp.float32): taps._asdict()},
    {full.key(jnp.float32): measured._asdict()},
  )
  assert cl.choose(full, jnp.float32, 'auto') == measured
  # Several devices and no mesh to say how the batch is split: no host-side kernels, the
  # table's choice among XLA's formulations.
  monkeypatch.setattr(jax, 'device_count', lambda: 8)
  assert cl.choose(full, jnp.float32, 'auto') == taps
  assert cl.choose(full, jnp.float32, 'onednn') == cl.ONEDNN  # asked for: runs anyway
  # A step traced on a mesh (sharding.traced_on) whose devices are one per process:
  # oneDNN on each device's rows, where the batch splits evenly over the mesh.
  mesh = sharding.make_mesh()
  assert sharding.traced_on(mesh, cl.choose)(full, jnp.float32, 'auto') == taps  # 8 here
  monkeypatch.setattr(jax, 'local_device_count', lambda: 1)
  assert sharding.traced_on(mesh, cl.choose)(full, jnp.float32, 'auto') == measured
  odd = full._replace(x_shape=(12, 8, 8, 64))
  assert sharding.traced_on(mesh, cl.batch_axes)(12) is None
  assert sharding.traced_on(mesh, cl.choose)(odd, jnp.float32, 'auto') == taps
  monkeypatch.setattr(jax, 'local_device_count', lambda: 8)
  one = sharding.make_mesh(jax.devices()[:1])
  assert sharding.traced_on(one, cl.choose)(full, jnp.float32, 'auto') == measured


@pytest.mark.onednn
@pytest.mark.mesh
@pytest.mark.skipif(not onednn.available(), reason='oneDNN does not load here')
def test_onednn_on_a_mesh_runs_each_devices_rows():
  """Over the session's 8 devices oneDNN sees a local batch of 16 / 8 = 2 rows; the
  weight gradient is the devices' sum. All three equal XLA's within float32 rounding."""
  g = cl.Geometry((16, 6, 5, 3), (3, 3, 3, 4), (2, 2), ((1, 1), (1, 1)))
  kx, kw, kd = jax.random.split(jax.random.key(0), 3)
  x, w = jax.random.normal(kx, g.x_shape), jax.random.normal(kw, g.w_shape)
  dy = jax.random.normal(kd, (16, *g.out_hw, 4))
  want, bounds = onednn_check.rounding_bounds(x, w, dy, g.strides, g.padding)
  mesh = sharding.make_mesh()
  assert mesh.devices.size == 8
  data, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)

  def conv_and_grads(x, w, dy):
    y, vjp = jax.vjp(lambda x, w: cl.lowered_conv(x, w, g, cl.ONEDNN), x, w)
    return (y, *vjp(dy))

  step = jax.jit(
    sharding.traced_on(mesh, conv_and_grads),
    in_shardings=(data, repl, data),
    out_shardings=(data, data, repl),
  )
  hlo = step.lower(x, w, dy).as_text()
  for direction in onednn.DIRECTIONS:
    assert f'resnet_jax_onednn_{direction}_2x6x5x3_3x3x4_s2x2' in hlo
  for name, got, ref, bound in zip(('y', 'dx', 'dw'), step(x, w, dy), want, bounds, strict=True):
    excess = float(jnp.max(jnp.abs(got - ref) / bound))
    assert excess <= 1.0, f'{name}: error {excess:.2f}x the rounding bound'


def test_conv_impl_onednn_without_the_library_says_how_to_get_it(monkeypatch):
  monkeypatch.setattr(onednn, 'available', lambda: False)
  g = cl.Geometry((2, 8, 8, 4), (3, 3, 4, 4), (1, 1), ((1, 1), (1, 1)))
  with pytest.raises(UserError, match='pip install onednn-cpu-gomp'):
    cl.choose(g, jnp.float32, 'onednn')


@pytest.mark.onednn
@pytest.mark.skipif(not onednn.available(), reason='oneDNN does not load here')
def test_onednn_failure_is_an_error_not_a_silent_result(monkeypatch):
  g = cl.Geometry((3, 6, 6, 4), (3, 3, 4, 4), (1, 1), ((1, 1), (1, 1)))

  def fail(self, *args):
    raise onednn.OneDnnError('injected')

  monkeypatch.setattr(onednn._Convolution, 'run', fail)
  x, w = jnp.ones(g.x_shape), jnp.ones(g.w_shape)
  with pytest.raises(Exception, match='injected'):
    jax.block_until_ready(jax.jit(lambda x, w: cl.lowered_conv(x, w, g, cl.ONEDNN))(x, w))


@pytest.mark.onednn
@pytest.mark.skipif(not onednn.available(), reason='oneDNN does not load here')
def test_onednn_under_vmap_equals_each_member():
  g = cl.Geometry((2, 5, 5, 3), (3, 3, 3, 4), (1, 1), ((1, 1), (1, 1)))
  xs = jax.random.normal(jax.random.key(0), (3, *g.x_shape))
  ws = jax.random.normal(jax.random.key(1), (3, *g.w_shape))
  loss = lambda x, w: jnp.sum(cl.lowered_conv(x, w, g, cl.ONEDNN) ** 2)
  got = jax.jit(jax.vmap(jax.grad(loss, (0, 1))))(xs, ws)
  for i in range(3):
    want = jax.grad(loss, (0, 1))(xs[i], ws[i])
    for a, b in zip(got, want, strict=True):
      np.testing.assert_array_equal(a[i], b)


def test_committed_table_names_known_lowerings():
  table = cl.measured_table()
  assert table.cpu, f'{cl.TABLE_FILE} does not say which CPU it was measured on'
  assert table.choices, (
    f'{cl.TABLE_FILE} is missing: run python -m benchmarks.conv_lowerings --write'
  )
  options = {'forward': cl.FORWARD, 'input_grad': cl.INPUT_GRAD, 'weight_grad': cl.WEIGHT_GRAD}
  for section in (table.choices, table.with_onednn):
    for key, choice in section.items():
      for direction, name in choice.items():
        assert name in options[direction], (key, direction, name)
  assert all('onednn' not in c.values() for c in table.choices.values())


@functools.cache
def _sgd_steps(conv_impl: str, steps: int = 3):
  """Loss and parameters after `steps` SGD steps of a small ImageNet-stem net on fixed
  data (7x7/2 stem, max pool, strided 3x3 and 1x1 projections, 3x3s on a 1x1 map): one
  basic block per stage has every convolution kind of ResNet-18."""
  model = models.build_model(
    'resnet18',
    stage_sizes=(1, 1, 1, 1),
    stage_widths=(8, 8, 16, 16),
    stem_width=8,
    num_classes=5,
    conv_impl=conv_impl,
  )
  x = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
  labels = jnp.arange(8) % 5
  variables = model.init(jax.random.key(0), x, train=False)
  params, stats = variables['params'], variables['batch_stats']
  tx = optax.sgd(0.01, momentum=0.9)
  opt = tx.init(params)

  def loss_fn(params, stats):
    logits, new = model.apply(
      {'params': params, 'batch_stats': stats}, x, train=True, mutable=['batch_stats']
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new

  @jax.jit
  def step(params, stats, opt):
    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), new['batch_stats'], opt, loss

  losses = []
  for _ in range(steps):
    params, stats, opt, loss = step(params, stats, opt)
    losses.append(float(loss))
  return np.array(losses), params


@pytest.mark.parametrize(
  'impl', ['auto', 'gemm', 'taps', pytest.param('onednn', marks=pytest.mark.onednn)]
)
def test_sgd_steps_equal_with_each_impl(impl):
  if impl == 'onednn' and not onednn.available():
    pytest.skip('oneDNN does not load here')
  want_losses, want = _sgd_steps('xla')
  losses, got = _sgd_steps(impl)
  # The convolutions agree to float32 rounding (above); BN's gradients are cancelling sums
  # over the batch, which lifts that to ~3e-5 of a leaf's largest gradient after one step
  # and ~4e-5 of its largest parameter after three (measured); a wrong tap or stride
  # moves them by O(1).
  np.testing.assert_allclose(losses, want_losses, rtol=5e-5)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, atol=2e-4 * float(jnp.max(jnp.abs(b))))
  assert jax.tree.structure(got) == jax.tree.structure(want)


def test_conv_impl_is_checked():
  with pytest.raises(Exception, match='conv_impl'):
    models.build_model('cifar_resnet20', conv_impl='fast')


@pytest.mark.onednn
@pytest.mark.skipif(not onednn.available(), reason='oneDNN does not load here')
def test_a_script_that_exits_with_its_program_running_exits():
  """Its oneDNN steps would need the GIL while the interpreter finalizes: hung 2 runs in 4
  before the exit waited for them."""
  result = run_python(
    """
    import jax, jax.numpy as jnp
    from resnet_jax import models
    model = models.build_model('cifar_resnet20', shortcut='B')
    x = jnp.zeros((2, 32, 32, 3))
    v = jax.jit(model.init, static_argnames='train')(jax.random.key(0), x, train=False)
    print(jax.jit(model.apply, static_argnames='train')(v, x, train=False).shape)
    """,
    timeout=120,
  )
  assert result.returncode == 0 and result.stdout.strip() == '(2, 10)', result.stderr[-2000:]
