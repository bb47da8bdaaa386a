"""Throughput benchmarks: the train step on synthetic device data (``synthetic``) and the
input pipeline against it (``pipeline``); ``python -m jax_resnet.benchmark`` is the CLI."""

import ml_collections


def measure(config: ml_collections.ConfigDict, mode: str = 'synthetic', **kwargs) -> dict:
  """One measurement of the config: synthetic (the step) or pipeline (input, step, loop)."""
  if mode == 'pipeline':
    from jax_resnet.benchmark.pipeline import benchmark_pipeline  # TensorFlow

    kwargs.pop('num_classes', None)
    return benchmark_pipeline(config, **kwargs)
  from jax_resnet.benchmark.synthetic import benchmark_step

  return benchmark_step(config, **kwargs)
