"""`--help` and `--version` of the absl commands, answered before absl parses any flag.

absl's own --help prints the docstring of `__main__` (none in a console script) and the
flags that `__main__` defines (none: ours live in their command's module), then exits 1;
--version is no absl flag at all.
"""

import importlib.metadata
import sys

from absl import flags

HELP_FLAGS = ('--help', '-h', '-?', '--helpshort')


def version() -> str:
  """'resnet-jax X.Y.Z': the installed package's version."""
  return f'resnet-jax {importlib.metadata.version("resnet-jax")}'


def help_text(usage: str, about: str, module: str, example: str) -> str:
  """A command's help: its usage line, what it does, one line per flag of `module` (from
  the flag definitions, so that it never goes stale) and one example."""
  defined = flags.FLAGS.get_flags_for_module(module)
  rows = [(f'--{f.name}', _described(f)) for f in defined]
  rows += [
    ('--help', 'this help (--helpfull: every flag of every library as well)'),
    ('--version', 'print the version of resnet-jax'),
  ]
  width = max(len(name) for name, _ in rows) + 2
  lines = [f'usage: {usage}', '', about, '', 'flags:']
  lines += [f'  {name:<{width}}{text}' for name, text in rows]
  return '\n'.join([*lines, '', 'example:', f'  {example}'])


def _described(flag: flags.Flag) -> str:
  default = flag.default
  if default in (None, '', []):
    return flag.help
  shown = ','.join(default) if isinstance(default, list) else default
  return f'{flag.help} (default: {shown})'


def answer_help_or_version(argv: list[str], text: str) -> None:
  """Print `text` (for --help, -h, ...) or the version (--version) and exit 0, if the
  command line asks for either; return otherwise."""
  own = argv[1 : argv.index('--')] if '--' in argv else argv[1:]
  if any(arg in HELP_FLAGS for arg in own):
    print(text)
    sys.exit(0)
  if '--version' in own:
    print(version())
    sys.exit(0)
