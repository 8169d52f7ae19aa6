"""Where the train step's device time goes: a profiler trace summed per XLA op and kind,
with the bytes each op moves and the bandwidth it reached.

    python -m benchmarks.step_profile --model resnet50 --batch 256 --dtype bf16 --steps 5

Builds the step exactly as train_throughput.py does (same flags, `--model_override` too),
compiles it once, warms it up, traces `--steps` steps with `jax.profiler.trace` and reads
the trace back with `jax.profiler.ProfileData`: every device event that names its HLO op
is summed per op and per kind of op (convolutions, reductions, elementwise fusions, ...).
Each op that the compiled step's optimized HLO runs as a kernel also gets the bytes its
operands and result name (`kernel_ops`), so the summary has MB and GB/s per op and per
kind. Prints the top ops as a table and one `RESULT {json}` line with ms per step per
kind, `gb_per_s_by_kind` and `top_fusions` (the slowest op instances with bytes and
GB/s). On a GPU the events are its kernels; on CPU, XLA's thunks. With CUDA graphs on
(XLA's default) events carry the command buffer's name, which has no bytes; pass
`--xla_flags=--xla_gpu_enable_command_buffer=` for per-fusion names. `--keep_trace DIR`
keeps the raw trace (open it in TensorBoard's profile plugin or xprof), `--dump_hlo DIR`
writes the optimized HLO to DIR/step.hlo.txt, `--show_fusions K` prints the fused
computations of the K slowest fusions.
"""

import argparse
import collections
import contextlib
import dataclasses
import glob
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax

from benchmarks import train_throughput as tt
from resnet_jax.errors import UserError

# The kind of an HLO op by its name; first match wins. cuDNN convolutions are custom calls
# named after their target; XLA's fusions are named after their root and fusion kind.
KINDS: tuple[tuple[str, str], ...] = (
  ('convolution', r'cudnn|convolution'),
  ('gemm', r'gemm|dot|cublas'),
  ('max pool', r'select-and-scatter|reduce.window|scatter'),
  ('reduction fusion', r'reduce|reduction'),
  ('elementwise fusion', r'fusion'),
  ('copy/transpose', r'copy|transpose'),
)


def op_kind(hlo_op: str) -> str:
  """The KINDS entry `hlo_op` falls under, or 'other'."""
  for kind, pattern in KINDS:
    if re.search(pattern, hlo_op):
      return kind
  return 'other'


# One array of an HLO shape string, `f32[8,<=16]`: its element type and dimensions. The
# layout in braces and the `/*index=5*/` comments of long tuples never match.
_ARRAY = re.compile(r'([a-z][a-z0-9]*)\[([^\]]*)\]')
_COMMENT = re.compile(r'/\*.*?\*/')
# A computation starts `[ENTRY] %name (parameters) -> shape {`, an instruction is
# `[ROOT] %name = shape opcode(operands), attributes`.
_HEADER = re.compile(r'(ENTRY\s+)?%?([^\s(]+)\s*\(.*\{$')
_INSTRUCTION = re.compile(r'\s+(ROOT\s+)?%?([^\s=]+)\s*=\s*(.+)')
_OPCODE = re.compile(r'\s*([\w-]+)\(')
_CALLED = re.compile(
  r'\b(?:body|condition|to_apply|calls|true_computation|false_computation|branch_computations)'
  r'=(\{[^}]*\}|[^,\s]+)'
)
# Instructions that launch nothing: a bitcast or a tuple's element is a view of a buffer.
FREE_OPCODES = frozenset(
  {'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'opt-barrier', 'after-all'}
)
# Control flow: the device runs the computations these call instruction by instruction (a
# while's body, a GPU command buffer's call), so the bytes are those instructions'.
WRAPPER_OPCODES = frozenset(
  {'while', 'conditional', 'call', 'async-start', 'async-update', 'async-done'}
)


@dataclasses.dataclass(frozen=True)
class Instruction:
  """One HLO instruction, `name = shape opcode(operands), attributes`."""

  name: str
  shape: str
  opcode: str
  operands: tuple[str, ...]
  attributes: str


@dataclasses.dataclass(frozen=True)
class Computation:
  """One HLO computation: its text and its instructions by name, in order."""

  name: str
  is_entry: bool
  text: str
  instructions: dict[str, Instruction]
  root: str


@dataclasses.dataclass(frozen=True)
class KernelOp:
  """An instruction the device runs as a kernel: the bytes it names and what it is."""

  bytes: int
  hint: str  # a fusion's kind and root ('kInput reduce'), a custom call's target, or the opcode
  reads: tuple[str, ...]  # its operands as 'name shape'
  fused: str | None  # a fusion's computation


def element_bits(dtype: str) -> int:
  """Bits of one element of the HLO element type `dtype`; pred takes a byte, a token none."""
  if dtype == 'pred':
    return 8
  width = re.search(r'\d+', dtype)  # bf16 -> 16, f8e4m3fn -> 8, c64 -> 64
  return int(width.group()) if width else 0


def shape_bytes(shape: str) -> int:
  """Bytes of the arrays in the HLO shape string `shape`, a tuple's elements summed."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    # A dynamic dimension (`<=16`) counts at its bound.
    sizes = [int(d.strip().removeprefix('<=')) for d in dims.split(',') if d.strip()]
    total += math.prod(sizes) * element_bits(dtype) // 8
  return total


def parse_hlo(text: str) -> dict[str, Computation]:
  """The computations of an HLO module's text (`Compiled.as_text()`) by name."""
  computations = {}
  lines: list[str] = []
  for line in text.splitlines():
    header = None if lines else _HEADER.match(line)
    if header:
      is_entry, name, lines = bool(header[1]), header[2], [line]
    elif lines:
      lines.append(line)
      if line == '}':
        computations[name] = _computation(name, is_entry, lines)
        lines = []
  return computations


def _computation(name: str, is_entry: bool, lines: list[str]) -> Computation:
  instructions, root = {}, ''
  for line in lines[1:-1]:
    match = _INSTRUCTION.match(line)
    if match:
      instruction = _instruction(match[2], match[3])
      instructions[instruction.name] = instruction
      root = instruction.name if match[1] else root
  return Computation(name, is_entry, '\n'.join(lines), instructions, root)


def _instruction(name: str, text: str) -> Instruction:
  """`text` is `shape opcode(operands), attributes`; a tuple's shape has spaces inside."""
  shape_end = _closing(text, 0) if text.startswith('(') else text.index(' ')
  opcode = _OPCODE.match(text, shape_end)
  if not opcode:
    raise ValueError(f'no opcode in HLO instruction {name} = {text[:200]}')
  operands_end = _closing(text, opcode.end() - 1)
  # An operand is `%name`, or `shape %name` where the printer adds shapes.
  operands = _top_level_split(_COMMENT.sub('', text[opcode.end() : operands_end - 1]))
  return Instruction(
    name,
    text[:shape_end],
    opcode[1],
    tuple(operand.split()[-1].lstrip('%') for operand in operands),
    text[operands_end:],
  )


def _closing(text: str, start: int) -> int:
  """The index just past the parenthesis that closes the one at `text[start]`."""
  depth = 0
  for i in range(start, len(text)):
    depth += {'(': 1, ')': -1}.get(text[i], 0)
    if depth == 0:
      return i + 1
  raise ValueError(f'unbalanced parentheses in HLO: {text[start : start + 200]}')


def _top_level_split(text: str) -> list[str]:
  """`text` split at the commas outside brackets, so an operand's shape stays whole."""
  parts, depth, start = [], 0, 0
  for i, char in enumerate(text):
    depth += (char in '([{') - (char in ')]}')
    if char == ',' and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  parts.append(text[start:])
  return [part.strip() for part in parts if part.strip()]


def _called(instruction: Instruction) -> list[str]:
  """The computations `instruction` names: a fusion's body, a while's, a reducer..."""
  return [
    name
    for group in _CALLED.findall(instruction.attributes)
    for name in re.findall(r'%?([\w.-]+)', group)
  ]


def executed_computations(module: Mapping[str, Computation]) -> list[Computation]:
  """The entry computation and those its control flow runs, instruction by instruction.

  A fusion's body or a reducer is part of one kernel instead, and not among them.
  """
  names = [name for name, computation in module.items() if computation.is_entry]
  for name in names:  # grows while it is walked: breadth first
    for instruction in module[name].instructions.values():
      if instruction.opcode in WRAPPER_OPCODES:
        names += [c for c in _called(instruction) if c in module and c not in names]
  return [module[name] for name in names]


def kernel_ops(module: Mapping[str, Computation]) -> dict[str, KernelOp]:
  """The bytes and a hint of every instruction the device runs as a kernel, by name.

  Kernels are the instructions of `executed_computations` less those that launch nothing
  (parameters, bitcasts, tuples, ...) and the control flow itself. An op's bytes are its
  operands' and its result's as the HLO names them, tuples summed: an estimate of its
  memory traffic, an upper bound where it reads an operand only in part (a slice or a
  pad fused in), a lower one where it reads an operand twice (two fused uses, a two-pass
  reduction's kernel) or writes through atomics. A bitcast operand counts as its source,
  the same bytes; a cuDNN call's result tuple includes its u8 workspace. Each op is
  charged its bytes once per step (the train step has no loops), however many kernels
  (events) it runs as.
  """
  kernels = {}
  for computation in executed_computations(module):
    shapes = {name: i.shape for name, i in computation.instructions.items()}
    for instruction in computation.instructions.values():
      if instruction.opcode in FREE_OPCODES | WRAPPER_OPCODES:
        continue
      operands = [o for o in instruction.operands if o in shapes]  # not literals
      fused = _called(instruction)[0] if instruction.opcode == 'fusion' else None
      kernels[instruction.name] = KernelOp(
        bytes=sum(shape_bytes(shapes[o]) for o in operands) + shape_bytes(instruction.shape),
        hint=_hint(instruction, module.get(fused)),
        reads=tuple(f'{o} {shapes[o]}' for o in operands),
        fused=fused,
      )
  return kernels


def _hint(instruction: Instruction, fused: Computation | None) -> str:
  """What the kernel is: 'kInput reduce' (a reduction fusion), a custom call's target..."""
  if fused is not None:
    kind = re.search(r'\bkind=(\w+)', instruction.attributes)
    return f'{kind[1] if kind else "fusion"} {_root_opcodes(fused)}'
  target = re.search(r'custom_call_target="([^"]*)"', instruction.attributes)
  return target[1] if target else instruction.opcode


def _root_opcodes(computation: Computation) -> str:
  """The root's opcode seen through bitcasts; a multi-output fusion's as `tuple(...)`."""

  def through_bitcasts(name: str) -> str:
    instruction = computation.instructions[name]
    while instruction.opcode == 'bitcast' and instruction.operands[0] in computation.instructions:
      instruction = computation.instructions[instruction.operands[0]]
    return instruction.opcode

  root = computation.instructions[computation.root]
  if root.opcode == 'tuple':
    return f'tuple({", ".join(through_bitcasts(o) for o in root.operands)})'
  return through_bitcasts(root.name)


def device_events(path: str) -> Iterator[tuple[str, float]]:
  """(HLO op, duration ns) of every event in the trace at `path` that names its op.

  Device planes (GPU streams) when the trace has them, else the host's XLA thunks (CPU).
  """
  profile = jax.profiler.ProfileData.from_file(path)
  planes = [p for p in profile.planes if p.name.startswith('/device:')]
  planes = planes or [p for p in profile.planes if p.name == '/host:CPU']
  for plane in planes:
    for line in plane.lines:
      for event in line.events:
        hlo_op = next((value for name, value in event.stats if name == 'hlo_op'), None)
        if hlo_op:
          yield str(hlo_op), event.duration_ns


def instance_ms(events: Iterator[tuple[str, float]], steps: int) -> collections.Counter:
  """Milliseconds per step of each op instance (`loop_reduce_fusion.12`) in `events`."""
  ms: collections.Counter = collections.Counter()
  for hlo_op, ns in events:
    ms[hlo_op] += ns / 1e6 / steps
  return ms


def summarize(
  ms_per_instance: collections.Counter, top: int, kernels: Mapping[str, KernelOp]
) -> dict[str, Any]:
  """Milliseconds per step per kind and for the `top` ops (numbered ops merged by name);
  the bytes `kernels` gives each op instance, and GB/s, for the `top` instances and per kind.
  """
  per_op: collections.Counter = collections.Counter()
  for op, ms in ms_per_instance.items():
    per_op[re.sub(r'\.\d+$', '', op)] += ms
  per_kind: collections.Counter = collections.Counter()
  for op, ms in per_op.items():
    per_kind[op_kind(op)] += ms
  total = sum(per_op.values())
  if not total:
    raise UserError('the trace holds no device events with an HLO op; is the profiler working?')
  # Ops the HLO has no kernel of (a command buffer, another module's) have no bytes.
  with_bytes = {op: ms for op, ms in ms_per_instance.items() if op in kernels}
  return {
    'device_ms_per_step': round(total, 3),
    'kinds': {k: round(ms, 3) for k, ms in per_kind.most_common()},
    'top_ops': [(op, round(ms, 3)) for op, ms in per_op.most_common(top)],
    'bytes_coverage': round(sum(with_bytes.values()) / total, 4),
    'gb_per_s_by_kind': _gb_per_s_by_kind(with_bytes, kernels),
    'top_fusions': [
      _instance_row(op, ms, kernels.get(op)) for op, ms in ms_per_instance.most_common(top)
    ],
  }


def _gb_per_s(num_bytes: float, ms: float) -> float | None:
  return round(num_bytes / ms / 1e6, 2) if ms else None


def _gb_per_s_by_kind(
  ms_per_op: Mapping[str, float], kernels: Mapping[str, KernelOp]
) -> dict[str, float | None]:
  """GB/s per kind over the ops in `ms_per_op` (those with bytes), slowest kind first."""
  ms: collections.Counter = collections.Counter()
  num_bytes: collections.Counter = collections.Counter()
  for op, op_ms in ms_per_op.items():
    ms[op_kind(op)] += op_ms
    num_bytes[op_kind(op)] += kernels[op].bytes
  return {kind: _gb_per_s(num_bytes[kind], kind_ms) for kind, kind_ms in ms.most_common()}


def _instance_row(op: str, ms: float, kernel: KernelOp | None) -> dict[str, Any]:
  """One op instance of `top_fusions`: its time, and its bytes and GB/s where known."""
  return {
    'op': op,
    'kind': op_kind(op),
    'hint': kernel.hint if kernel else None,
    'ms': round(ms, 4),
    'mb': round(kernel.bytes / 1e6, 3) if kernel else None,
    'gb_per_s': _gb_per_s(kernel.bytes, ms) if kernel else None,
  }


def fusion_bodies(
  ms_per_instance: collections.Counter,
  module: Mapping[str, Computation],
  kernels: Mapping[str, KernelOp],
  count: int,
) -> str:
  """The fused computations of the `count` slowest fusions, each under what the fusion
  reads: its operands, which are its computation's parameters in order."""
  blocks = []
  ops = [op for op, _ in ms_per_instance.most_common() if op in kernels and kernels[op].fused]
  for op in ops[:count]:
    row, kernel = _instance_row(op, ms_per_instance[op], kernels[op]), kernels[op]
    blocks.append(
      f'--- {op} ({kernel.hint}): {row["ms"]} ms/step, {row["mb"]} MB, {row["gb_per_s"]} GB/s\n'
      f'reads: {", ".join(kernel.reads)}\n{module[kernel.fused].text}'
    )
  return '\n'.join(blocks)


def profile(args: argparse.Namespace) -> dict[str, Any]:
  """Trace `args.steps` warm steps of the harness's step; the summary row."""
  run = tt.prepare(args)
  state, batch = run.state, run.batches[0]
  # One executable gives both the HLO and the trace, so the trace's op names are the HLO's.
  step = run.step_fn.lower(state, batch).compile()
  hlo = step.as_text()
  hlo_path = write_hlo(hlo, args.dump_hlo) if args.dump_hlo else None
  module = parse_hlo(hlo)
  kernels = kernel_ops(module)
  for _ in range(1 + args.warmup):
    state, _ = step(state, batch)
  jax.block_until_ready(state)
  events, trace_path = traced_events(step, state, batch, args)
  ms_per_instance = instance_ms(events, args.steps)
  row = summarize(ms_per_instance, args.top, kernels)
  if args.show_fusions:
    print(fusion_bodies(ms_per_instance, module, kernels, args.show_fusions))
  device = run.mesh.devices.flat[0]
  return {
    'who': 'step_profile',
    'label': args.label,
    'model': args.model,
    'batch': args.batch,
    'image_size': args.image_size,
    'dtype': run.dtype,
    'model_overrides': args.model_overrides,
    'steps': args.steps,
    **row,
    'device_kind': device.device_kind,
    'jax': jax.__version__,
    'trace': trace_path if args.keep_trace else None,
    'hlo': hlo_path,
  }


def write_hlo(hlo: str, directory: str) -> str:
  """`hlo` written to `directory`/step.hlo.txt; its path."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, 'step.hlo.txt')
  with open(path, 'w') as f:
    f.write(hlo)
  return path


def traced_events(
  step: Callable, state: Any, batch: Any, args: argparse.Namespace
) -> tuple[list[tuple[str, float]], str]:
  """`args.steps` steps from `state` traced; their device events and the trace's path, in
  `args.keep_trace` or else a temporary directory removed once read."""
  trace_dir_context = (
    contextlib.nullcontext(args.keep_trace)
    if args.keep_trace
    else tempfile.TemporaryDirectory(prefix='step_profile_')
  )
  with trace_dir_context as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(args.steps):
        state, _ = step(state, batch)
      jax.block_until_ready(state)
    paths = sorted(glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True))
    if not paths:
      raise UserError(f'jax.profiler wrote no .xplane.pb under {trace_dir}.')
    return list(device_events(paths[-1])), paths[-1]


def table(row: dict[str, Any]) -> str:
  """The row as text: kinds, then the top ops, in ms per step and % of device time; then
  the top op instances with the bytes they move and GB/s."""
  total = row['device_ms_per_step']
  lines = [f'{row["model"]} batch {row["batch"]} {row["dtype"]}: {total:.2f} ms device time/step']
  for name, ms in list(row['kinds'].items()) + [('---', None)] + row['top_ops']:
    lines.append('-' * 40 if ms is None else f'{ms:9.3f} ms {100 * ms / total:5.1f}%  {name}')
  return '\n'.join(lines + _bandwidth_lines(row))


def _bandwidth_lines(row: dict[str, Any]) -> list[str]:
  """The section 'bytes and GB/s per op' of `table`."""
  kinds = ', '.join(f'{k} {_fmt(gb_s, 0, 1)}' for k, gb_s in row['gb_per_s_by_kind'].items())
  lines = [
    f'--- bytes and GB/s per op ({100 * row["bytes_coverage"]:.1f}% of device time has bytes:'
    ' operands + result as the HLO names them)',
    f'GB/s per kind: {kinds}',
    '  ms/step         MB      GB/s  op (kernel)',
  ]
  for op in row['top_fusions']:
    lines.append(
      f'{op["ms"]:9.4f} {_fmt(op["mb"], 10, 3)} {_fmt(op["gb_per_s"], 9, 1)}  '
      f'{op["op"]} ({op["hint"] or "no HLO match"})'
    )
  return lines


def _fmt(value: float | None, width: int, digits: int) -> str:
  return f'{"-":>{width}}' if value is None else f'{value:{width}.{digits}f}'


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point: the table, then the RESULT line."""
  p = argparse.ArgumentParser(add_help=False)
  p.add_argument('--top', type=int, default=25, help='ops to list')
  p.add_argument('--keep_trace', default='', help='write the trace here and keep it')
  p.add_argument('--dump_hlo', default='', metavar='DIR', help='write DIR/step.hlo.txt')
  p.add_argument(
    '--show_fusions',
    type=int,
    default=0,
    metavar='K',
    help='print the fused computations of the K slowest fusions',
  )
  own, rest = p.parse_known_args(argv)
  args = tt.parse_args(rest)
  vars(args).update(vars(own))
  tt.configure_process(args)
  return tt.report(lambda: profile(args), show=table)


if __name__ == '__main__':
  sys.exit(main())
