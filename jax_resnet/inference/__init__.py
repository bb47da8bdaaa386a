"""A trained model out of the trainer: exports that carry their metadata (``export``) and
prediction with eval's own preprocessing (``predict``, ``image_prep``), no TensorFlow."""
