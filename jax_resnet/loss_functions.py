"""The losses of training and evaluation: softmax cross-entropy (with label smoothing),
timm's binary cross-entropy, and knowledge distillation's soft-target loss.

A floor of its own, below ``augment`` and ``training``: Mixup and CutMix mix the smoothed
one-hot targets made here, and the train step scores the logits against them.
"""

import jax
import jax.numpy as jnp
import optax

LOSSES = ('softmax', 'bce')


def smooth_one_hot(labels, num_classes: int, label_smoothing: float = 0.0):
  """timm's one-hot: off value smoothing / num_classes, on value 1 - smoothing + off."""
  off_value = label_smoothing / num_classes
  on_value = 1.0 - label_smoothing + off_value
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return one_hot * (on_value - off_value) + off_value


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
  """Per-example softmax cross-entropy against (smoothed) integer labels."""
  return optax.softmax_cross_entropy(logits, smooth_one_hot(labels, num_classes, label_smoothing))


def binary_cross_entropy(logits, targets, target_threshold: float | None = None):
  """Per-example sigmoid BCE, averaged over classes: timm's ``BinaryCrossEntropy``.

  timm reduces with ``binary_cross_entropy_with_logits(reduction='mean')``, the mean over
  batch and classes, so the batch mean of this is exactly timm's loss (its gradient is
  1/num_classes of the BCE summed over classes, which learning rates tuned in timm assume).
  ``target_threshold`` binarises soft targets (above it 1, else 0), timm's
  ``--bce-target-thresh``.
  """
  targets = targets.astype(jnp.float32)
  if target_threshold is not None:
    targets = (targets > target_threshold).astype(jnp.float32)
  losses = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets)
  return jnp.mean(losses, axis=-1)


def distillation_loss(logits, teacher_logits, temperature: float):
  """Hinton et al.'s soft-target loss: T^2 KL(softmax(teacher/T) || softmax(student/T)),
  per example (T^2 keeps its gradients on the scale of the hard-label loss)."""
  teacher = jax.nn.log_softmax(teacher_logits / temperature)
  student = jax.nn.log_softmax(logits / temperature)
  return temperature**2 * jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)


def training_loss(
  logits,
  targets,
  *,
  loss: str = 'softmax',
  teacher_logits=None,
  distill_weight: float = 0.0,
  distill_temperature: float = 1.0,
):
  """Per-example loss: softmax cross-entropy (or timm's binary cross-entropy, ``loss='bce'``)
  against the soft targets, blended with the distillation loss when a teacher's logits
  are given."""
  if loss == 'bce':
    hard = binary_cross_entropy(logits, targets)
  else:
    hard = optax.softmax_cross_entropy(logits, targets)
  if teacher_logits is None:
    return hard
  soft = distillation_loss(logits, teacher_logits, distill_temperature)
  return (1 - distill_weight) * hard + distill_weight * soft
