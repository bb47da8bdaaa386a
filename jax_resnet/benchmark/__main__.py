"""python -m jax_resnet.benchmark: see ``jax_resnet.benchmark.synthetic``."""

from absl import app, flags

from jax_resnet.benchmark import synthetic

if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(synthetic.main)
