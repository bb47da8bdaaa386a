"""Trains, evaluates, exports or predicts with a ResNet: ``jax_resnet/cli.py`` from a
checkout (the same command as ``jax-resnet`` and ``python -m jax_resnet``)."""

from jax_resnet import cli  # first: it catches an early SIGTERM or Ctrl-C

if __name__ == '__main__':
  cli.run()
