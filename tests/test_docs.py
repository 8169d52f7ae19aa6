"""The docs cannot rot: every block, command, path, module and link of README.md and docs/.

Fenced blocks say what they are in their info string (docs/development.md, "Docs that
are tested"):
- `bash`: quick commands (seconds). Each page's blocks run in order with bash from a fresh
  temporary directory that links to the repository's files, so `configs/smoke.py` and
  `../shared/datasets` resolve and `workdir/...` is new; each must exit 0.
- `bash long`: long jobs, never run. Each training, conversion, benchmark or experiment
  command in them has its flags parsed without running: training commands load their
  config with its overrides and build the model and optimizer (`train.build`, no data);
  `run_suite.py` runs with `--dry_run` and the commands it prints are checked the same way.
- `python`: run as `python -c` in the page's turn, from the same fresh directory (the
  README's library example is tests/test_api.py's, which also checks its output).
- `text`: output or other text, not run.
"""

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]
KINDS = ('bash', 'bash long', 'python', 'text')
BLOCK_TIMEOUT_S = 300
# Top-level folders whose paths the docs name; a path starting with one must exist.
REPO_DIRS = ('resnet_jax', 'configs', 'experiments', 'benchmarks', 'tests', 'docs', '.ci')
FILE_SUFFIXES = ('md', 'py', 'sh', 'png', 'json', 'jsonl', 'txt', 'toml')


@dataclasses.dataclass(frozen=True)
class Block:
  page: Path
  line: int  # of the opening fence, 1-based
  info: str
  text: str

  @property
  def where(self) -> str:
    return f'{self.page.relative_to(REPO)}:{self.line}'


def blocks(page: Path) -> list[Block]:
  """The fenced blocks of a Markdown page (indented ones in list items too)."""
  lines, found, i = page.read_text().splitlines(), [], 0
  while i < len(lines):
    opening = re.match(r'^( *)(`{3,}|~{3,})(.*)$', lines[i])
    if not opening:
      i += 1
      continue
    indent, fence, info = len(opening[1]), opening[2], opening[3].strip()
    end = i + 1
    while end < len(lines) and not re.match(rf'^ *{fence}{fence[0]}*\s*$', lines[end]):
      end += 1
    body = [line[indent:] if line[:indent].isspace() else line for line in lines[i + 1 : end]]
    found.append(Block(page, i + 1, info, '\n'.join(body) + '\n'))
    i = end + 1
  return found


def prose(page: Path) -> str:
  """The page without its fenced blocks (headings and links live there)."""
  text = page.read_text().splitlines()
  inside = set()
  for b in blocks(page):
    inside.update(range(b.line - 1, b.line + b.text.count('\n') + 1))
  return '\n'.join(line for n, line in enumerate(text) if n not in inside)


def _id(page: Path) -> str:
  return str(page.relative_to(REPO))


def test_every_block_is_marked():
  bad = [f'{b.where}: {b.info!r}' for p in PAGES for b in blocks(p) if b.info not in KINDS]
  assert not bad, f'mark each block as one of {KINDS}:\n' + '\n'.join(bad)


def test_every_docs_page_is_linked_from_the_readme():
  readme = (REPO / 'README.md').read_text()
  missing = [_id(p) for p in PAGES[1:] if f'({_id(p)})' not in readme]
  assert not missing, f'README.md lists no line for {missing}'


# --- runnable blocks -----------------------------------------------------------------------


def _quick_blocks(page: Path) -> list[Block]:
  # The README's python block is tests/test_api.py's (run there, its output checked).
  kinds = ('bash',) if page.name == 'README.md' else ('bash', 'python')
  return [b for b in blocks(page) if b.info in kinds]


def test_readme_library_example_is_run_by_test_api():
  assert "split('## Use as a library'" in (REPO / 'tests' / 'test_api.py').read_text()
  assert '## Use as a library' in (REPO / 'README.md').read_text()


def fresh_checkout(tmp_path: Path) -> Path:
  """A directory that links to every file of the repository (copying nothing), beside a
  link to ../shared, with no workdir in it."""
  root = tmp_path / 'repo'
  root.mkdir()
  for entry in REPO.iterdir():
    if not entry.name.startswith(('workdir', 'tmp', '.git')):
      (root / entry.name).symlink_to(entry)
  shared = REPO.parent / 'shared'
  if shared.exists():
    (tmp_path / 'shared').symlink_to(shared)
  return root


def user_env() -> dict[str, str]:
  """A user's shell with the project installed: this interpreter's bin first on PATH, and
  the devices a plain process gets (not the test session's XLA_FLAGS)."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['PATH'] = f'{Path(sys.executable).parent}{os.pathsep}{env.get("PATH", "")}'
  return env


@pytest.mark.parametrize('page', [p for p in PAGES if _quick_blocks(p)], ids=_id)
def test_quick_blocks_run(page, tmp_path):
  root, env = fresh_checkout(tmp_path), user_env()
  for block in _quick_blocks(page):
    if block.info == 'bash':
      cmd = ['bash', '-e', '-o', 'pipefail', '-c', block.text]
    else:
      cmd = [sys.executable, '-c', block.text]
    run = subprocess.run(
      cmd, cwd=root, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S
    )
    output = (run.stdout + run.stderr)[-4000:]
    assert run.returncode == 0, (
      f'{block.where} exited with {run.returncode}:\n{block.text}--- output (end)\n{output}'
    )


# --- long blocks: flags parsed, not run ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Command:
  where: str
  kind: str  # 'train', 'convert', 'argparse' (a module or script), 'suite' (run_suite.py)
  target: str  # module name or script path ('' for train and convert)
  argv: tuple[str, ...]


def shell_commands(text: str) -> Iterator[list[str]]:
  """The simple commands of a shell text, as token lists, comments dropped."""
  for line in text.replace('\\\n', ' ').splitlines():
    lexer = shlex.shlex(line, posix=True, punctuation_chars=';&|')
    lexer.whitespace_split = True
    lexer.commenters = '#'
    command: list[str] = []
    for token in lexer:
      if set(token) <= set(';&|'):
        yield command
        command = []
      else:
        command.append(token)
    yield command


def _module_file(module: str) -> Path:
  path = REPO.joinpath(*module.split('.'))
  return path / '__main__.py' if path.is_dir() else path.with_suffix('.py')


def invocations(text: str, where: str) -> Iterator[Command]:
  """The project's commands in a shell text (also inside a quoted `--command="..."`)."""
  for tokens in shell_commands(text):
    for token in tokens:
      if ' ' in token and re.search(r'\bpython3? |resnet-jax-', token):
        yield from invocations(token.split('=', 1)[1] if token.startswith('--') else token, where)
    names = [Path(t).name for t in tokens]
    starts = [i for i, n in enumerate(names) if n in ('python', 'python3') or 'resnet-jax-' in n]
    if not starts:
      continue
    i = starts[0]
    program, args = names[i], tokens[i + 1 :]
    if program.startswith('resnet-jax-'):
      kind = {'resnet-jax-train': 'train', 'resnet-jax-convert': 'convert'}.get(program)
      target = '' if kind else 'resnet_jax.models.summary'
      yield Command(where, kind or 'argparse', target, tuple(args))
    elif args[:1] == ['-m'] and len(args) > 1:
      module, rest = args[1], tuple(args[2:])
      if module == 'resnet_jax.commands.main':
        yield Command(where, 'train', '', rest)
      elif module == 'resnet_jax.commands.convert':
        yield Command(where, 'convert', '', rest)
      elif module.startswith(('resnet_jax.', 'benchmarks.', 'experiments.')) and (
        'parse_args' in _module_file(module).read_text()  # not benchmarks.compare
      ):
        yield Command(where, 'argparse', module, rest)
    elif args and args[0].endswith('.py'):
      script, rest = args[0], tuple(args[1:])
      if script == 'main.py':
        yield Command(where, 'train', '', rest)
      elif script == 'experiments/run_suite.py':
        yield Command(where, 'suite', script, rest)
      elif script.startswith(('experiments/', 'benchmarks/')):
        yield Command(where, 'argparse', script, rest)
      # other scripts (tests/run.py, ...): their paths are checked below


# Run in a fresh interpreter at the repo root; reads [[where, kind, target, argv], ...] as
# JSON on stdin, prints {"errors": [[where, message], ...], "commands": [[where, argv]]}.
CHECKER = textwrap.dedent(
  r"""
  import argparse, contextlib, io, json, os, runpy, shlex, sys, warnings
  sys.path.insert(0, os.getcwd())
  warnings.filterwarnings('ignore', message='.*found in sys.modules')  # runpy on a package
  items, errors, commands = json.load(sys.stdin), [], []

  def fresh_flags():
    # Unparsed, without the --config.FIELD flags that the last command's overrides defined.
    from absl import flags
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith('config.')]:
      delattr(flags.FLAGS, name)

  def train_check(where, argv):
    from absl import flags
    from resnet_jax.commands import main as command
    from resnet_jax.training import train
    fresh_flags()
    sys.argv = ['main.py', *argv]  # ml_collections reads the overrides from sys.argv
    command._parse_flags(sys.argv)
    if flags.FLAGS.mode == 'train' and flags.FLAGS.checkpoint_step is not None:
      raise ValueError('--checkpoint_step is for --mode=eval')
    train.build(flags.FLAGS.config, check_data=False)

  def convert_check(where, argv):
    from absl import flags
    from resnet_jax.commands import convert  # noqa: F401 (defines the flags)
    from resnet_jax.training import train
    FLAGS = flags.FLAGS
    fresh_flags()
    sys.argv = ['resnet-jax-convert', *argv]
    FLAGS(sys.argv)
    if (FLAGS['from'].value is None) == (FLAGS.to is None):
      raise ValueError('give either --from or --to')
    train.build(FLAGS.config, check_data=False)

  class Parsed(Exception):
    pass

  STOP = [True]
  parse_args = argparse.ArgumentParser.parse_args

  def parse_only(self, args=None, namespace=None):
    result = parse_args(self, args, namespace)
    if STOP[0]:
      raise Parsed
    return result

  argparse.ArgumentParser.parse_args = parse_only

  def run_program(target, argv):
    sys.argv = [target, *argv]
    if target.endswith('.py'):
      runpy.run_path(target, run_name='__main__')
    else:
      runpy.run_module(target, run_name='__main__', alter_sys=True)

  def argparse_check(where, target, argv):
    try:
      run_program(target, argv)
    except Parsed:
      return
    raise ValueError('ran without parsing its flags')

  def suite_check(where, target, argv):
    STOP[0], out = False, io.StringIO()
    try:
      with contextlib.redirect_stdout(out):
        run_program(target, [*argv, '--dry_run'])
    finally:
      STOP[0] = True
    for line in out.getvalue().splitlines():
      tokens = shlex.split(line)
      commands.append([f'{where} (via run_suite.py)', tokens[tokens.index('main.py') + 1 :]])

  for where, kind, target, argv in items:
    stderr = io.StringIO()
    try:
      with contextlib.redirect_stderr(stderr):
        if kind == 'train':
          train_check(where, argv)
        elif kind == 'convert':
          convert_check(where, argv)
        elif kind == 'suite':
          suite_check(where, target, argv)
        else:
          argparse_check(where, target, argv)
    except SystemExit as e:
      if e.code not in (0, None):
        errors.append([where, f'exit status {e.code}: {stderr.getvalue().strip()[-1500:]}'])
    except Exception as e:
      errors.append([where, f'{type(e).__name__}: {e}'])
  print(json.dumps({'errors': errors, 'commands': commands}))
  """
)

# Misspelt flags and fields that the checks must catch, checked in the same processes.
SMOKE = ('--config=configs/smoke.py', '--workdir=w')
CANARIES = (
  Command('canary', 'train', '', (*SMOKE, '--config.batchsize=8')),
  Command('canary', 'train', '', (*SMOKE, '--mdoe=eval')),
  Command('canary', 'train', '', (*SMOKE, '--config.lr_schedule=cosin')),
  Command('canary', 'train', '', ('--config=configs/smok.py', '--workdir=w')),
  Command('canary', 'convert', '', (*SMOKE, '--too=x.safetensors')),
  Command('canary', 'argparse', 'benchmarks.cpu_vs_torch', ('--modles', 'cifar_resnet20')),
  Command('canary', 'suite', 'experiments/run_suite.py', ('--suite=cifar10', '--workdir=w')),
)


def check(commands: list[Command]) -> tuple[list[list[str]], list[list]]:
  """Errors and the commands a suite printed, from one checker process."""
  items = [[c.where, c.kind, c.target, list(c.argv)] for c in commands]
  run = subprocess.run(
    [sys.executable, '-c', CHECKER],
    input=json.dumps(items),
    cwd=REPO,
    env=user_env(),
    capture_output=True,
    text=True,
    timeout=BLOCK_TIMEOUT_S,
  )
  assert run.returncode == 0, run.stderr[-4000:]
  result = json.loads(run.stdout.strip().splitlines()[-1])
  return result['errors'], result['commands']


def test_long_commands_parse():
  found = [
    c
    for p in PAGES
    for b in blocks(p)
    if b.info == 'bash long'
    for c in invocations(b.text, b.where)
  ]
  assert {c.kind for c in found} >= {'train', 'convert', 'argparse', 'suite'}, found
  errors, printed = check([c for c in (*found, *CANARIES) if c.kind in ('argparse', 'suite')])
  assert printed, 'run_suite.py --dry_run printed no commands'
  from_suites = [Command(where, 'train', '', tuple(argv)) for where, argv in printed]
  # train and convert each define --config: one process each.
  for kind in ('train', 'convert'):
    more, _ = check([c for c in (*found, *from_suites, *CANARIES) if c.kind == kind])
    errors += more
  canaries = [e for e in errors if e[0] == 'canary']
  assert len(canaries) == len(CANARIES), f'a misspelling went unnoticed: {canaries}'
  real = [f'{where}: {message}' for where, message in errors if where != 'canary']
  assert not real, 'commands in `bash long` blocks that do not parse:\n' + '\n'.join(real)


# --- paths, modules and links --------------------------------------------------------------

_DIRS = '|'.join(map(re.escape, REPO_DIRS))
PATH = re.compile(rf'(?<![\w./~$-])((?:{_DIRS})/[\w./{{}},*<>:-]*)')
MODULE = re.compile(r'(?<![\w./-])((?:resnet_jax|benchmarks|experiments)(?:\.\w+)+)')
LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)\)')


def expand_braces(text: str) -> list[str]:
  match = re.search(r'\{([^{}]*)\}', text)
  if not match:
    return [text]
  head, tail = text[: match.start()], text[match.end() :]
  return [s for part in match[1].split(',') for s in expand_braces(head + part + tail)]


def named_paths(text: str) -> set[str]:
  """Repository paths named in `text`, placeholders cut off (`DIR/<run>` -> `DIR`)."""
  paths = set()
  for raw in PATH.findall(text):
    path = raw.split(':')[0]
    cut = min((path.index(c) for c in '<*' if c in path), default=None)
    if cut is not None:
      path = path[: path.rfind('/', 0, cut)]
    paths.update(expand_braces(path.rstrip('.,;')))
  return paths


@pytest.mark.parametrize('page', PAGES, ids=_id)
def test_named_paths_exist(page):
  missing = sorted(p for p in named_paths(page.read_text()) if not (REPO / p).exists())
  assert not missing, f'{_id(page)} names paths that do not exist: {missing}'


def _defines(module_file: Path, name: str) -> bool:
  source = module_file.read_text()
  pattern = rf'^(?:def|class)\s+{name}\b|^{name}\s*[:=]|[\'"]{name}[\'"]\s*:'
  return re.search(pattern, source, re.M) is not None


def missing_module(name: str) -> str | None:
  """Why the dotted `name` (a module, or a module and a name it defines) does not exist."""
  parts = name.split('.')
  if parts[-1] in FILE_SUFFIXES:
    return None  # a file name (benchmarks.md), checked as a path or link
  for k in range(len(parts), 0, -1):
    base = REPO.joinpath(*parts[:k])
    module_file = base / '__init__.py' if base.is_dir() else base.with_suffix('.py')
    if module_file.exists():
      if k == len(parts) or _defines(module_file, parts[k]):
        return None
      return f'{".".join(parts[:k])} defines no {parts[k]}'
  return 'no such module'


@pytest.mark.parametrize('page', PAGES, ids=_id)
def test_named_modules_exist(page):
  names = sorted(set(MODULE.findall(page.read_text())))
  bad = [f'{n}: {why}' for n in names if (why := missing_module(n))]
  assert not bad, f'{_id(page)} names modules that do not exist: {bad}'


def slug(heading: str) -> str:
  """GitHub's anchor for a heading."""
  return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def anchors(page: Path) -> set[str]:
  """The anchors of a page's headings, numbered as GitHub numbers repeated ones."""
  found, counts = set(), {}
  for heading in re.findall(r'^#{1,6}\s+(.*?)\s*#*$', prose(page), re.M):
    base = slug(heading)
    counts[base] = counts.get(base, 0) + 1
    found.add(base if counts[base] == 1 else f'{base}-{counts[base] - 1}')
  return found


@pytest.mark.parametrize('page', PAGES, ids=_id)
def test_links_resolve(page):
  bad = []
  for target in LINK.findall(prose(page)):
    if re.match(r'[a-z]+:', target):
      continue  # https:, mailto:
    path, _, anchor = target.partition('#')
    file = (page.parent / path).resolve() if path else page
    if not file.exists():
      bad.append(f'{target}: no such file')
    elif anchor and file.suffix == '.md' and anchor not in anchors(file):
      bad.append(f'{target}: no such section in {file.relative_to(REPO)}')
  assert not bad, f'{_id(page)} has broken links: {bad}'
