"""TensorFlow for the input pipeline, CPU only: it must never take accelerator memory
from JAX. Every module of the pipeline imports ``tf`` from here."""

import tensorflow as tf

tf.config.set_visible_devices([], 'GPU')

__all__ = ['tf']
