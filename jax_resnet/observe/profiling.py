"""Where the time goes: device traces, a table of the top operations, and a training
run's wall time by part.

``trace(logdir)`` records a profile that TensorBoard's profile plugin (xprof) opens
(``LOGDIR/plugins/profile/RUN/*.xplane.pb``), with a Perfetto trace beside it
(``perfetto_trace.json.gz``, for ui.perfetto.dev). ``top_ops`` reads that file back with
``jax.profiler.ProfileData`` and totals the time of each XLA operation (every event that
carries an ``hlo_op``: thunks on CPU, kernels on GPU and TPU), so the table needs no UI;
given the compiled HLO text it names each operation's shapes (for a fusion, the
convolution or dot inside it).

``StepProfiler`` profiles a window of training steps (``config.profile_first_step``,
``config.profile_steps``). clu's ``periodic_actions.Profile`` stops its trace as soon as
the step counter passes the window, while the dispatched steps may still be running on
the device, so their work would fall outside the trace; this one waits for the state
once, at the window's end (the only added sync, and only in a profiled run).

``RunClock`` splits a training run's wall time into parts (start-up, setup, compilation,
input waits, steps, evaluation, checkpoints, logging), written to
``WORKDIR/timing.json`` at the end.
"""

import collections
import contextlib
import dataclasses
import glob
import json
import os
import re
import time

import jax
from absl import logging

TOP_OPS_FILE = 'top_ops.txt'


@contextlib.contextmanager
def trace(logdir: str):
  """Profiles what runs inside; the trace lands in a new run folder under ``logdir``."""
  os.makedirs(logdir, exist_ok=True)
  with jax.profiler.trace(logdir, create_perfetto_trace=True):
    yield


def latest_xplane(logdir: str) -> str:
  """The newest ``*.xplane.pb`` under ``logdir`` (one per host and profile)."""
  found = glob.glob(os.path.join(logdir, 'plugins', 'profile', '*', '*.xplane.pb'))
  if not found:
    raise FileNotFoundError(f'No *.xplane.pb under {logdir}/plugins/profile/.')
  return max(found, key=os.path.getmtime)


@dataclasses.dataclass
class OpTime:
  """One XLA operation's share of the profiled time."""

  name: str
  module: str
  count: int
  total_ms: float
  share: float = 0.0
  shapes: str = ''


def top_ops(xplane_path: str, hlo_texts=(), limit: int = 20) -> list[OpTime]:
  """The ``limit`` operations with the most time in the profile, largest first.

  ``share`` is of the summed time of all operations (ops on different threads or
  streams can overlap, so the sum may exceed the wall time). ``hlo_texts``: compiled
  HLO (``compiled.as_text()``) of the profiled programs, for the shapes column.
  """
  profile = jax.profiler.ProfileData.from_file(xplane_path)
  totals = collections.defaultdict(lambda: [0, 0.0])
  for plane in profile.planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if 'hlo_op' not in stats:
          continue
        entry = totals[(str(stats['hlo_op']), str(stats.get('hlo_module', '')))]
        entry[0] += 1
        entry[1] += event.duration_ns / 1e6
  all_ms = sum(ms for _, ms in totals.values()) or 1.0
  shapes = hlo_shapes(hlo_texts)
  rows = [
    OpTime(name, module, count, ms, ms / all_ms, shapes.get(name, ''))
    for (name, module), (count, ms) in totals.items()
  ]
  rows.sort(key=lambda r: r.total_ms, reverse=True)
  return rows[:limit]


_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$')
_COMPUTATION = re.compile(r'^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_LAYOUT = re.compile(r'\{[^{}]*\}')
_OPCODE = re.compile(r'^(.*?)\s([a-z][\w\-]*)\((.*)$')
_HEAVY = ('convolution', 'dot', 'custom-call', 'reduce-window', 'select-and-scatter', 'reduce')


@dataclasses.dataclass
class _Instruction:
  result: str
  opcode: str
  operands: list
  window: str
  calls: str


def _parse(rest: str) -> _Instruction | None:
  window = re.search(r'window=\{size=([\dx]+)', rest)
  calls = re.search(r'calls=%?([\w.\-]+)', rest)
  match = _OPCODE.match(' ' + _LAYOUT.sub('', rest))
  if not match:
    return None
  result, opcode, args = match.groups()
  operands = re.findall(r'%?([\w.\-]+)', args.split(')')[0])
  return _Instruction(
    result.strip(),
    opcode,
    operands,
    window.group(1) if window else '',
    calls.group(1) if calls else '',
  )


def hlo_shapes(hlo_texts) -> dict[str, str]:
  """Instruction name -> 'opcode result <- operand shapes' from compiled HLO text; a fusion
  is described by its heaviest fused instruction (convolution, dot, ...) when it has one."""
  instructions, computations, current = {}, collections.defaultdict(list), None
  for text in hlo_texts:
    for raw in text.splitlines():
      head = raw.split('{')[0]
      if raw.rstrip().endswith('{') and '=' not in head and '(' in head:
        match = _COMPUTATION.match(raw)
        current = match.group(1) if match else None
        continue
      match = _INSTRUCTION.match(raw)
      parsed = _parse(match.group(2)) if match else None
      if parsed:
        instructions[match.group(1)] = parsed
        if current:
          computations[current].append(parsed)

  def describe(op: _Instruction) -> str:
    shapes = list(dict.fromkeys(instructions[o].result for o in op.operands if o in instructions))
    shown = ', '.join(shapes[:4]) + (f', +{len(shapes) - 4} more' if len(shapes) > 4 else '')
    window = f' {op.window}' if op.window else ''
    return f'{op.opcode}{window} {op.result} <- {shown}'

  described = {}
  for name, op in instructions.items():
    inner = computations.get(op.calls, [])
    heavy = next((i for h in _HEAVY for i in inner if i.opcode == h), None)
    described[name] = describe(heavy) if heavy else describe(op)
  return described


def format_table(rows: list[OpTime], steps: int = 1) -> str:
  """A fixed-width table: time per step, share, calls per step, op and shapes."""
  out = [f'{"ms/step":>9} {"share":>6} {"calls":>6}  op  [shapes]']
  for r in rows:
    out.append(
      f'{r.total_ms / steps:9.3f} {r.share:6.1%} {r.count / steps:6.1f}  {r.name}'
      + (f'  [{r.shapes}]' if r.shapes else '')
    )
  return '\n'.join(out)


def write_top_ops(logdir: str, hlo_texts=(), steps: int = 1, limit: int = 20) -> str:
  """Reads the newest profile under ``logdir``, writes ``logdir/top_ops.txt`` and returns
  the table."""
  table = format_table(top_ops(latest_xplane(logdir), hlo_texts, limit), steps)
  with open(os.path.join(logdir, TOP_OPS_FILE), 'w') as f:
    f.write(table + '\n')
  return table


class StepProfiler:
  """Profiles training steps [first_step, first_step + num_steps) into ``logdir``.

  Call ``before(step, state)`` before each dispatch and ``after(step, state)`` after it
  with the step reached; ``hlo_texts`` is asked for the compiled programs' text when the
  table is written.
  """

  def __init__(self, logdir: str, first_step: int, num_steps: int, hlo_texts=lambda: ()):
    self._logdir, self._first, self._num = logdir, first_step, num_steps
    self._hlo_texts = hlo_texts
    self._started_at = None
    self._done = num_steps <= 0

  def before(self, step: int, state) -> None:
    """Starts the trace before the dispatch that runs step ``first_step`` (counting from 1,
    as the log does; the first dispatch that reaches it), once the steps before it
    finished (so that their work stays out of the trace). ``step``: steps done so far."""
    if not self._done and self._started_at is None and step + 1 >= self._first:
      jax.block_until_ready(state)
      os.makedirs(self._logdir, exist_ok=True)
      jax.profiler.start_trace(self._logdir, create_perfetto_trace=True)
      self._started_at = step

  def after(self, step: int, state) -> None:
    """Stops it once ``num_steps`` steps ran, waiting for them to finish first."""
    if self._done or self._started_at is None or step < self._started_at + self._num:
      return
    self._done = True  # once per run
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    steps = step - self._started_at
    if jax.process_index() == 0:
      table = write_top_ops(self._logdir, self._hlo_texts(), steps)
      logging.info(
        'Profiled steps %d-%d into %s (TensorBoard: --logdir=%s, Profile tab). Top operations:\n%s',
        self._started_at + 1,
        step,
        self._logdir,
        self._logdir,
        table,
      )


class RunClock:
  """Wall time by part. ``part(name)`` charges the time inside it to ``name``; a part
  entered inside another pauses the outer one, so nothing is counted twice and the parts
  add up to the wall time but for the loop's own bookkeeping (``unaccounted_s``)."""

  PARTS = (
    'startup',  # before training began: imports, flags, config (from main.py)
    'setup',  # mesh, data set, model, state, restore, evaluators
    'compile',  # the train step(s), ahead of time
    'input_wait',  # waiting for the next batch
    'steps',  # dispatching steps and waiting for them at log steps
    'eval',  # every evaluator, its compilation included
    'checkpoint',  # saves, the best checkpoint, waiting for saves to land
    'logging',  # model summary, metric writers, progress, curves, profiles
  )

  def __init__(self, started_at: float | None = None):
    now = time.perf_counter()
    self._start = now if started_at is None else started_at
    self.seconds = dict.fromkeys(self.PARTS, 0.0)
    self.seconds['startup'] = now - self._start
    self._stack, self._since = [], now

  @contextlib.contextmanager
  def part(self, name: str):
    self._switch()
    self._stack.append(name)
    try:
      yield
    finally:
      self._switch()
      self._stack.pop()

  def _switch(self) -> None:
    now = time.perf_counter()
    if self._stack:
      self.seconds[self._stack[-1]] += now - self._since
    self._since = now

  def summary(self) -> dict:
    """{'wall_s', one '<part>_s' per part, 'unaccounted_s'}, in seconds."""
    wall = time.perf_counter() - self._start
    out = {'wall_s': wall, **{f'{k}_s': v for k, v in self.seconds.items()}}
    out['unaccounted_s'] = wall - sum(self.seconds.values())
    return out

  def write(self, path: str, **extra) -> dict:
    summary = {**self.summary(), **extra}
    partial = f'{path}.partial-{os.getpid()}'  # renamed when whole: never a cut file
    with open(partial, 'w') as f:
      json.dump(summary, f, indent=1)
    os.replace(partial, path)
    logging.info(
      'Wall time %.1f s: %s.',
      summary['wall_s'],
      ', '.join(f'{k} {self.seconds[k]:.1f}' for k in self.PARTS),
    )
    return summary
