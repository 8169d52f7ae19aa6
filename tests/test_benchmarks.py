"""The benchmark harnesses run, report what they promise and import no tensorflow."""

import argparse
import collections
import json
import textwrap

import pytest

from benchmarks import bn_stats, compare, conv_lowerings, cpu_vs_torch, step_profile, torch_memory
from benchmarks import train_throughput as tt
from resnet_jax import models
from resnet_jax.errors import UserError
from tests.helpers import result_rows, run_python


def test_harness_reports_a_result_without_tensorflow_or_ml_collections():
  # As on the GPU machines: no ml_collections (so the config fallback runs), and the run
  # must not pull in tensorflow. Two devices, so the global batch is really sharded.
  proc = run_python(
    """
      import sys
      sys.modules['ml_collections'] = None  # makes `import ml_collections` fail
      import benchmarks.compare, benchmarks.precision_check, benchmarks.torch_memory
      from benchmarks import train_throughput
      code = train_throughput.main(['--model', 'cifar_resnet20', '--batch', '8',
                                    '--image_size', '16', '--steps', '2', '--windows', '2',
                                    '--warmup', '1', '--compilation_cache_dir', '',
                                    '--model_override', 'stage_sizes=(1,1,1)'])
      assert 'tensorflow' not in sys.modules, 'a benchmark module imported tensorflow'
      sys.exit(code)
      """,
    devices=2,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  [row] = result_rows(proc.stdout)
  assert row['img_per_s'] > 0 and row['step_ms'] > 0 and row['compile_s'] > 0
  assert row['device_count'] == 2 and row['per_device_batch'] == 4
  assert row['xla_flops_per_step'] > 0 and row['model_flops_per_step'] > 0
  assert row['finite'] and row['donation_ok'] and not row['cache_hit']
  assert row['mfu'] is None and row['peak_bytes_in_use'] is None  # CPU: no peak, no memory stats
  assert len(row['img_per_s_windows']) == 2


def test_fallback_recipe_equals_configs_default():
  from configs import default

  config = default.get_config()
  assert {k: config[k] for k in tt.DEFAULT_RECIPE} == tt.DEFAULT_RECIPE


def test_optimizer_config_is_the_recipe_at_a_constant_rate():
  config = tt.optimizer_config(512)
  assert (config.batch_size, config.lr_schedule, config.warmup_steps) == (512, 'constant', 0)
  assert config.nesterov and config.weight_decay == 1e-4


@pytest.mark.parametrize(
  'kind,dtype,peak',
  [
    ('NVIDIA H100 80GB HBM3', 'bfloat16', 989.4),
    ('NVIDIA H100 80GB HBM3', 'float32', 494.7),
    ('NVIDIA H100 PCIe', 'bfloat16', 756.0),
    ('NVIDIA H200', 'bfloat16', 989.4),
    ('NVIDIA A100-SXM4-80GB', 'bfloat16', 312.0),
    ('cpu', 'bfloat16', None),
  ],
)
def test_peak_table(kind, dtype, peak):
  assert tt.peak_tflops(kind, dtype) == peak


def test_parse_args_defaults_follow_the_model():
  assert tt.parse_args(['--model', 'cifar_resnet20']).image_size == 32
  args = tt.parse_args(['--model', 'mnist_resnet34'])
  assert (args.image_size, args.channels) == (28, 1)
  assert tt.DTYPES[tt.parse_args([]).dtype] == 'bfloat16'


def test_torch_memory_adds_peak_memory_to_each_variant(tmp_path):
  # Without torch here: a stand-in torch and torch_reference with the real one's interface.
  (tmp_path / 'torch.py').write_text(
    textwrap.dedent("""
      class cuda:
        peak = 0
        is_available = staticmethod(lambda: True)
        empty_cache = staticmethod(lambda: None)
        reset_peak_memory_stats = staticmethod(lambda: setattr(cuda, 'peak', 0))
        max_memory_allocated = staticmethod(lambda: cuda.peak)
        max_memory_reserved = staticmethod(lambda: 2 * cuda.peak)
      """)
  )
  reference = tmp_path / 'torch_reference.py'
  reference.write_text(
    textwrap.dedent("""
      import torch
      def measure(model_name, variant, batch, image, steps, warmup):
        torch.cuda.peak = 1000 if 'compiled' in variant else 3000
        return dict(who='torchvision', model=model_name, variant=variant, batch=batch,
                    image=image, img_per_s=1.0)
      """)
  )
  proc = run_python(
    f"""
      import sys
      sys.path.insert(0, {str(tmp_path)!r})
      from benchmarks import torch_memory
      sys.exit(torch_memory.main(['--model', 'resnet18', '--batch', '4', '--label', 'x']))
      """,
    TORCH_REFERENCE=str(reference),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  eager, compiled = result_rows(proc.stdout)
  assert (eager['variant'], eager['peak_bytes'], eager['peak_reserved_bytes']) == (
    'bf16_eager',
    3000,
    6000,
  )
  assert (compiled['variant'], compiled['peak_bytes'], compiled['label']) == (
    'bf16_compiled',
    1000,
    'x',
  )


def test_find_reference_names_where_it_looked(tmp_path, monkeypatch):
  monkeypatch.delenv('TORCH_REFERENCE', raising=False)
  with pytest.raises(FileNotFoundError, match='nowhere.py'):
    torch_memory.find_reference(str(tmp_path / 'nowhere.py'))


def test_compare_table_ratios_and_targets():
  jax_row = dict(
    who='resnet_jax',
    label='r50',
    model='resnet50',
    batch=256,
    image_size=224,
    dtype='bfloat16',
    img_per_s=7500.0,
    peak_bytes_in_use=20 * 2**30,
    compile_s=50.0,
    cache_hit=False,
    model_mfu=0.2,
    loss_first=7.0,
    loss_last=6.0,
    finite=True,
  )
  torch_row = dict(
    who='torchvision',
    model='resnet50',
    batch=256,
    image=224,
    variant='bf16_compiled',
    img_per_s=5000.0,
    peak_bytes=25 * 2**30,
  )
  text = compare.table(
    compare.load(['RESULT ' + json.dumps(jax_row), json.dumps(torch_row), 'not a result'])
  )
  line = text.splitlines()[1].split()
  assert line[4:8] == ['7500', '5000', '1.50', '+0.0%'] and line[9:12] == ['20.00', '25.00', '0.80']
  assert line[-1] == 'met' and '7.00->6.00 ok' in text
  # A variant of the same step is compared with the default rows of the same run.
  variant = dict(
    jax_row, label='pool', img_per_s=8250.0, model_overrides={'max_pool_impl': 'index'}
  )
  flagged = dict(jax_row, label='flag', img_per_s=6750.0, extra_xla_flags='--xla_x=true')
  lines = compare.table([jax_row, torch_row, variant, flagged]).splitlines()
  assert [line.split()[7] for line in lines[1:4]] == ['+0.0%', '+10.0%', '-10.0%']


def test_parse_overrides_literals_strings_and_errors():
  assert tt.parse_overrides(['shortcut=A', 'stage_sizes=(1, 1)', 'residual=False']) == {
    'shortcut': 'A',
    'stage_sizes': (1, 1),
    'residual': False,
  }
  with pytest.raises(UserError, match='FIELD=VALUE'):
    tt.parse_overrides(['shortcut'])


def test_full_loop_benchmark_reports_its_windows_beside_the_harness():
  # The real train_and_evaluate on two devices: windows of 2 steps, a checkpoint, an eval.
  args = ['--model', 'cifar_resnet20', '--batch', '8', '--image_size', '16', '--dtype', 'fp32']
  args += ['--model_override', 'stage_sizes=(1,1,1)']  # ResNet-8: a third of the compile
  proc = run_python(
    f"""
      import sys
      from benchmarks import loop_throughput, train_throughput
      args = {args!r}
      assert train_throughput.main(args + ['--steps', '2', '--windows', '2', '--warmup', '1',
                                           '--compilation_cache_dir', '']) == 0
      sys.exit(loop_throughput.main(args + ['--steps', '6', '--log_every', '2',
                                            '--checkpoint_every', '4',
                                            '--compilation_cache_dir', '']))
      """,
    devices=2,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  harness, loop = result_rows(proc.stdout)
  assert loop['who'] == 'resnet_jax_loop' and len(loop['img_per_s_windows']) == 3
  assert loop['img_per_s'] > 0 and 0 <= loop['eval_top1'] <= 1
  text = compare.table([harness, loop])
  ratio = loop['img_per_s'] / harness['img_per_s']
  assert f'full loop cifar_resnet20 batch 8 float32: {loop["img_per_s"]:.0f} img/s' in text
  assert f'ratio {ratio:.3f}' in text


@pytest.mark.parametrize(
  'hlo_op, kind',
  [
    ('cudnn-conv-bw-filter.12', 'convolution'),
    ('input_reduce_select_fusion.3', 'reduction fusion'),
    ('input_scatter_fusion', 'max pool'),
    ('loop_reduce_window_fusion', 'max pool'),
    ('loop_maximum_fusion.7', 'elementwise fusion'),
    ('loop_convert_fusion', 'elementwise fusion'),
    ('command_buffer_935', 'other'),
  ],
)
def test_step_profile_kinds(hlo_op, kind):
  assert step_profile.op_kind(hlo_op) == kind


@pytest.mark.parametrize(
  'shape, num_bytes',
  [
    ('bf16[256,56,56,64]{3,2,1,0}', 256 * 56 * 56 * 64 * 2),
    ('f32[64]', 256),
    ('(f32[64]{0}, f32[64]{0})', 512),
    ('pred[8,4]{1,0}', 32),
    ('s32[]', 4),
    ('(s32[], f32[16], f32[16]{0}, f32[16], f32[16], /*index=5*/bf16[2,3]{1,0:T(8,128)})', 272),
    ('(bf16[8,16]{1,0}, u8[0]{0})', 256),
    ('f32[<=8,4]{1,0}', 128),
    ('s4[10]', 5),
    ('f8e4m3fn[16]', 16),
    ('token[]', 0),
  ],
)
def test_step_profile_shape_bytes(shape, num_bytes):
  assert step_profile.shape_bytes(shape) == num_bytes


# A module as `Compiled.as_text()` prints one, with what the byte count must see through:
# a reducer and fusion bodies (no kernels), a multi-output reduction fusion, a cuDNN custom
# call with a tuple result, a while loop whose body runs a fusion (operands printed with
# their shapes), a command buffer's call, bitcasts, tuples and an operand list with an
# `/*index=5*/` comment.
STEP_HLO = """\
HloModule jit_step, entry_computation_layout={(bf16[8,4,4,16]{3,2,1,0}, f32[16]{0})->(f32[16]{0})}

%region_add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.1 = f32[] add(%a, %b)
}

%fused_stats (param_0: bf16[8,4,4,16]) -> (f32[16], f32[16]) {
  %param_0 = bf16[8,4,4,16]{3,2,1,0} parameter(0)
  %convert.1 = f32[8,4,4,16]{3,2,1,0} convert(%param_0)
  %zero = f32[] constant(0)
  %reduce.1 = f32[16]{0} reduce(%convert.1, %zero), dimensions={0,1,2}, to_apply=%region_add
  %multiply.1 = f32[8,4,4,16]{3,2,1,0} multiply(%convert.1, %convert.1)
  %reduce.2 = f32[16]{0} reduce(%multiply.1, %zero), dimensions={0,1,2}, to_apply=%region_add
  ROOT %tuple.1 = (f32[16]{0}, f32[16]{0}) tuple(%reduce.1, %reduce.2)
}

%fused_scale (param_0.1: f32[16], param_1: f32[16]) -> f32[1,16] {
  %param_0.1 = f32[16]{0} parameter(0)
  %param_1 = f32[16]{0} parameter(1)
  %multiply.2 = f32[16]{0} multiply(%param_0.1, %param_1)
  ROOT %bitcast.1 = f32[1,16]{1,0} bitcast(%multiply.2)
}

%body (loop: (s32[], f32[16])) -> (s32[], f32[16]) {
  %loop = (s32[], f32[16]{0}) parameter(0)
  %i = s32[] get-tuple-element(%loop), index=0
  %v = f32[16]{0} get-tuple-element(%loop), index=1
  %scaled = f32[1,16]{1,0} fusion(f32[16]{0} %v, f32[16]{0} %v), kind=kLoop, calls=%fused_scale
  %flat = f32[16]{0} bitcast(%scaled)
  ROOT %next = (s32[], f32[16]{0}) tuple(%i, %flat)
}

%cond (loop.1: (s32[], f32[16])) -> pred[] {
  %loop.1 = (s32[], f32[16]{0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%loop.1), index=0
  %ten = s32[] constant(10)
  ROOT %less = pred[] compare(%i.1, %ten), direction=LT
}

%command_buffer (p: f32[16]) -> f32[16] {
  %p = f32[16]{0} parameter(0)
  ROOT %negate.1 = f32[16]{0} negate(%p)
}

ENTRY %main (x: bf16[8,4,4,16], w: f32[16]) -> (f32[16], f32[96]) {
  %x = bf16[8,4,4,16]{3,2,1,0} parameter(0)
  %w = f32[16]{0} parameter(1)
  %conv = (bf16[8,4,4,16], u8[0]) custom-call(%x, %x), custom_call_target="__cudnn$convForward"
  %y = bf16[8,4,4,16]{3,2,1,0} get-tuple-element(%conv), index=0
  %stats = (f32[16]{0}, f32[16]{0}) fusion(%y), kind=kInput, calls=%fused_stats
  %mean = f32[16]{0} get-tuple-element(%stats), index=0
  %start = s32[] constant(0)
  %init = (s32[], f32[16]{0}) tuple(%start, %mean)
  %while = (s32[], f32[16]{0}) while(%init), condition=%cond, body=%body
  %result = f32[16]{0} get-tuple-element(%while), index=1
  %negated = f32[16]{0} call(%w), to_apply=%command_buffer
  %cat = f32[96]{0} concatenate(%w, %w, %w, %w, %w, /*index=5*/%w), dimensions={0}
  ROOT %out = (f32[16]{0}, f32[96]{0}) tuple(%result, %cat)
}

FileNames
1 "step.py"
"""


def test_step_profile_kernels_are_the_executed_instructions_and_their_bytes():
  module = step_profile.parse_hlo(STEP_HLO)
  assert len(module) == 7 and module['main'].is_entry and module['main'].root == 'out'
  executed = {c.name for c in step_profile.executed_computations(module)}
  # Not the fusion bodies, not the reducer.
  assert executed == {'main', 'cond', 'body', 'command_buffer'}
  kernels = step_profile.kernel_ops(module)
  x_bytes = 8 * 4 * 4 * 16 * 2  # bf16[8,4,4,16]
  assert {op: (k.bytes, k.hint) for op, k in kernels.items()} == {
    'conv': (3 * x_bytes, '__cudnn$convForward'),  # two bf16 operands, tuple result + u8[0]
    'stats': (x_bytes + 2 * 64, 'kInput tuple(reduce, reduce)'),
    'cat': (6 * 64 + 384, 'concatenate'),
    'scaled': (3 * 64, 'kLoop multiply'),  # the root seen through its bitcast
    'less': (4 + 4 + 1, 'compare'),
    'negate.1': (2 * 64, 'negate'),
  }
  assert kernels['stats'].reads == ('y bf16[8,4,4,16]{3,2,1,0}',)
  # The slowest op is the convolution, which is no fusion.
  ms = collections.Counter({'conv': 2.0, 'stats': 1.0, 'scaled': 0.5})
  text = step_profile.fusion_bodies(ms, module, kernels, 1)
  assert text.startswith('--- stats (kInput tuple(reduce, reduce)): 1.0 ms/step, 0.004 MB')
  assert 'reads: y bf16[8,4,4,16]' in text and '%reduce.2 = f32[16]{0} reduce(' in text


def test_step_profile_summarizes_bytes_and_gb_per_s():
  kernels = {'input_reduce_fusion.3': step_profile.KernelOp(6_000_000, 'kInput reduce', (), 'f')}
  events = [('input_reduce_fusion.3', 3e6)] * 2 + [('command_buffer_935', 2e6)]
  ms = step_profile.instance_ms(iter(events), steps=2)
  row = step_profile.summarize(ms, top=5, kernels=kernels)
  assert row['device_ms_per_step'] == 4.0 and row['bytes_coverage'] == 0.75
  assert row['gb_per_s_by_kind'] == {'reduction fusion': 2.0}  # 6 MB in 3 ms
  assert row['top_fusions'] == [
    {
      'op': 'input_reduce_fusion.3',
      'kind': 'reduction fusion',
      'hint': 'kInput reduce',
      'ms': 3.0,
      'mb': 6.0,
      'gb_per_s': 2.0,
    },
    # A command buffer's events have no instruction of their own, hence no bytes.
    {
      'op': 'command_buffer_935',
      'kind': 'other',
      'hint': None,
      'ms': 1.0,
      'mb': None,
      'gb_per_s': None,
    },
  ]
  text = step_profile.table({'model': 'm', 'batch': 1, 'dtype': 'float32', **row})
  assert 'bytes and GB/s per op (75.0% of device time has bytes' in text
  assert '6.000       2.0  input_reduce_fusion.3 (kInput reduce)' in text
  assert '-         -  command_buffer_935 (no HLO match)' in text


def test_step_profile_traces_the_step_and_sums_per_op(tmp_path):
  proc = run_python(
    f"""
      import sys
      from benchmarks import step_profile
      sys.exit(step_profile.main(['--model', 'cifar_resnet20', '--batch', '8', '--image_size',
                                  '16', '--dtype', 'fp32', '--steps', '2', '--top', '5',
                                  '--compilation_cache_dir', '', '--show_fusions', '1',
                                  '--dump_hlo', {str(tmp_path)!r},
                                  '--model_override', 'stage_sizes=(1,1,1)']))
      """
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  (row,) = result_rows(proc.stdout)
  assert row['who'] == 'step_profile' and len(row['top_ops']) == 5
  assert row['device_ms_per_step'] > 0
  assert sum(row['kinds'].values()) == pytest.approx(row['device_ms_per_step'], rel=1e-3)
  assert 'ms device time/step' in proc.stdout
  # On CPU every thunk's event names an instruction of the entry computation.
  assert row['bytes_coverage'] > 0.9 and len(row['top_fusions']) == 5
  assert all(op['mb'] > 0 and op['gb_per_s'] > 0 for op in row['top_fusions'])
  assert all(gb_s > 0 for gb_s in row['gb_per_s_by_kind'].values())
  assert 'bytes and GB/s per op' in proc.stdout and '\nreads: ' in proc.stdout
  assert row['hlo'] == str(tmp_path / 'step.hlo.txt')
  assert (tmp_path / 'step.hlo.txt').read_text().startswith('HloModule')


def test_bn_stats_finds_every_bn_and_its_ways_agree(capsys):
  # ResNet-50: the stem's BN, 3 per bottleneck block (16 blocks), 4 projection shortcuts.
  shapes = bn_stats.bn_input_shapes(models.build_model('resnet50'), (224, 224, 3), 2)
  assert len(shapes) == 53 and shapes[0] == (2, 112, 112, 64)
  args = ['--model', 'cifar_resnet20', '--batch', '2', '--image_size', '8']
  assert bn_stats.main(args + ['--dtype', 'fp32', '--windows', '1', '--reps', '1']) == 0
  rows = result_rows(capsys.readouterr().out)
  assert [r['way'] for r in rows] == [
    'read_ceiling',
    'flax',
    'spatial_first',
    'blocked256',
    'blocked2048',
    'blocked16384',
  ]
  assert rows[0]['bn_layers'] == 19 and all(r['max_rel_diff'] < 1e-5 for r in rows[1:])


def test_stack_benchmark_rows_and_table_without_tensorflow_or_ml_collections():
  proc = run_python(
    """
      import sys
      sys.modules['ml_collections'] = None
      from benchmarks import stack_throughput
      code = stack_throughput.main(['--models', 'cifar_resnet20', '--members', '2',
                                    '--methods', 'unroll,vmap', '--batch', '8', '--steps', '1',
                                    '--windows', '1', '--warmup', '0',
                                    '--model_override', 'stage_sizes=(1,1,1)'])
      assert 'tensorflow' not in sys.modules, 'the stack benchmark imported tensorflow'
      sys.exit(code)
      """,
    devices=2,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = result_rows(proc.stdout)
  assert [(r['members'], r['method']) for r in rows] == [(1, 'single'), (2, 'unroll'), (2, 'vmap')]
  assert all(r['img_per_s'] > 0 and r['num_devices'] == 2 for r in rows)
  assert all(r['model_overrides'] == {'stage_sizes': [1, 1, 1]} for r in rows)
  table = [line for line in proc.stdout.splitlines() if line.startswith('| cifar_resnet20')]
  assert len(table) == 3 and table[0].split('|')[6].strip() == '1.00'


def test_conv_lowerings_measures_and_writes_a_table(tmp_path):
  geometries = conv_lowerings.model_geometries('cifar_resnet20', 2, 'float32', 64)
  assert [g.x_shape[1:] for g in geometries[:2]] == [(32, 32, 3), (32, 32, 16)]
  assert len(geometries) == 6  # the stem, a 3x3 per stage, a strided 3x3 from stage 2 on
  rows = conv_lowerings.measure(geometries[-1], 'float32', windows=1, reps=1, margin=0.05)
  assert [r['direction'] for r in rows] == list(conv_lowerings.DIRECTIONS)
  for row in rows:
    candidates = set(conv_lowerings.DIRECTIONS[row['direction']][0])
    assert set(row['ms']) == candidates - ({'onednn'} - set(row['ms']))
    assert row['ms']['xla'] / row['speedup_vs_xla'] == pytest.approx(row['ms'][row['choice']], 1e-2)
    assert row['choice'] != 'onednn' and row['choice_with_onednn'] in (row['choice'], 'onednn')
  path = tmp_path / 'table.json'
  args = argparse.Namespace(
    models='cifar_resnet20', batch=2, dtype='float32', windows=1, reps=1, margin=0.05
  )
  conv_lowerings.write_table(str(path), rows, args)
  table = json.loads(path.read_text())
  assert table['choices'] == {rows[0]['conv']: {r['direction']: r['choice'] for r in rows}}
  if 'onednn' in rows[0]['ms']:
    want = {r['direction']: r['choice_with_onednn'] for r in rows}
    assert table['choices_with_onednn'] == {rows[0]['conv']: want}


def test_cpu_vs_torch_without_torch_says_how_to_get_it():
  proc = run_python(
    """
      import sys
      sys.modules['torch'] = None  # makes `import torch` fail
      from benchmarks import cpu_vs_torch
      sys.exit(cpu_vs_torch.main(['--models', 'cifar_resnet20']))
      """
  )
  assert proc.returncode == 2
  assert proc.stdout.strip() == f'error: {cpu_vs_torch.TORCH_HINT}'
