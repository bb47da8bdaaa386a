"""``python -m jax_resnet``: the ``jax-resnet`` command (``jax_resnet/cli.py``)."""

from jax_resnet import cli

if __name__ == '__main__':
  cli.run()
