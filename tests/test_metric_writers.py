"""The JSON-lines history: a last line cut short by a crash is moved aside, not extended."""

import json

from jax_resnet.observe import metric_writers


def test_a_cut_last_line_is_moved_aside_before_the_next_record(tmp_path, caplog):
  path = tmp_path / 'metrics.jsonl'
  whole = json.dumps({'step': 20, 'train_loss': 1.5})
  path.write_text(whole + '\n{"step": 30, "eval_top1": 0.22005571')  # a crash mid-write
  writer = metric_writers.JsonlWriter(str(path))
  writer.write_scalars(40, {'train_loss': 1.25})
  records = [json.loads(line) for line in path.read_text().splitlines()]  # valid JSONL
  assert [r['step'] for r in records] == [20, 40]
  aside = tmp_path / 'metrics.jsonl.partial-0'
  assert aside.read_text() == '{"step": 30, "eval_top1": 0.22005571'
  assert 'metrics.jsonl.partial-0' in caplog.text
  metric_writers.JsonlWriter(str(path))  # a whole file is left as it is
  assert not (tmp_path / 'metrics.jsonl.partial-1').exists()
  assert len(path.read_text().splitlines()) == 2
