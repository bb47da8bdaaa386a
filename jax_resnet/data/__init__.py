"""The input pipeline: data sources, host transforms, batching, and on-device batches.

- ``common``: what the TensorFlow-free core shares with the pipeline (``DatasetInfo``,
  normalisation statistics, source names, the shuffle seed). No TensorFlow.
- ``sources``: ``load_dataset`` and the ``Dataset`` it returns; one module per source:
  ``digits`` (embedded), ``tfds_source`` (tensorflow-datasets), ``folder`` (class
  folders of images).
- ``transforms``: the host-side tf.data ops, each stateless in a seed.
- ``batching``: train batches (reshuffled each epoch, resumable mid-epoch) and padded,
  masked eval batches.
- ``on_device``: small data sets kept whole on the device, cropped and flipped there.
  No TensorFlow.

Modules that use TensorFlow import it through ``tf_cpu``, which hides every GPU from it.
"""
