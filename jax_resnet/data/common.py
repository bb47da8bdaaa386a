"""What the TensorFlow-free core (steps, benchmark, checkpoints, validation) shares with
the input pipeline: the description of a data set, normalisation statistics, the names
of the sources and crop styles, and the shuffle seed of an epoch. No TensorFlow."""

import dataclasses

# Per-channel statistics in uint8 units (0-255).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
KNOWN_STATS = {
  'cifar10': (
    (0.4914 * 255, 0.4822 * 255, 0.4465 * 255),
    (0.2470 * 255, 0.2435 * 255, 0.2616 * 255),
  ),
  'cifar100': (
    (0.5071 * 255, 0.4865 * 255, 0.4409 * 255),
    (0.2673 * 255, 0.2564 * 255, 0.2762 * 255),
  ),
}
# (training examples, classes) of the data sets whose sizes are known without reading
# them: the benchmark's schedules and heads, and its seconds per epoch.
KNOWN_SIZES = {
  'imagenet2012': (1_281_167, 1000),
  'cifar10': (50_000, 10),
  'cifar100': (50_000, 100),
  'digits': (1_438, 10),
}

EMBEDDED_DATASETS = ('digits',)
FOLDER = 'folder'
# 'pad': pad-and-random-crop (fixed-size images); 'random_resized': ImageNet-style.
CROP_STYLES = ('auto', 'pad', 'random_resized')
CLASS_INDEX_FILE = 'class_index.json'  # written to the workdir by folder data sets


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model, the steps and a later predict or export need to know of the data."""

  num_classes: int
  num_train: int
  num_eval: int
  image_shape: tuple[int, int, int]  # what the model sees: (H, W, C)
  mean: tuple[float, ...]  # per channel, in uint8 units
  std: tuple[float, ...]
  class_names: tuple[str, ...] = ()  # label i's name; empty when the source has none
  # How eval (and predict) preprocess: 'pad' sets resize the image to image_shape;
  # 'random_resized' sets take a centre crop of eval_crop_fraction of the shorter side.
  crop_style: str = 'pad'
  eval_crop_fraction: float = 0.875
  # Which of TensorFlow's two bilinear resizes eval used (antialiased or not): predict
  # repeats it exactly; even when enlarging they round .5 ties differently.
  resize_antialias: bool = False

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, record: dict) -> 'DatasetInfo':
    fields = {f.name for f in dataclasses.fields(cls)}
    record = {k: v for k, v in record.items() if k in fields}
    for key in ('image_shape', 'mean', 'std', 'class_names'):
      if key in record:
        record[key] = tuple(record[key])
    return cls(**record)


@dataclasses.dataclass(frozen=True)
class InputOptions:
  """How training batches are drawn, whichever the source (the config's field names)."""

  seed: int  # the shuffle and every host or on-device augmentation
  batch_size: int  # global, over all devices of all hosts
  shuffle_buffer: int
  deterministic_input: bool  # tf.data keeps order: bit-exact resume
  data_on_device: bool  # the whole uint8 set on the device (digits, CIFAR)
  random_crop_pad: int  # on the device: pad-and-random-crop
  random_flip: bool  # on the device: horizontal flips


def imagenet_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """ImageNet's mean and std for ``channels`` channels (grey: the channel average)."""
  return channel_stats(IMAGENET_MEAN, IMAGENET_STD, channels)


def channel_stats(mean, std, channels: int):
  """``mean``/``std`` for RGB, or their averages repeated for another channel count."""
  if channels == len(mean):
    return tuple(mean), tuple(std)
  return (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels


def epoch_and_batch(
  step: int, steps_per_epoch: int, epoch_origin: tuple[int, int] = (0, 0)
) -> tuple[int, int]:
  """(epoch, batch within it) of the step about to run after ``step`` steps, in epochs of
  ``steps_per_epoch`` counted from ``epoch_origin``, the (step, epoch) where the training
  set's present size took effect: (0, 0) unless a run resumed after examples were added
  or removed (``training/prepare.epoch_origin``)."""
  origin_step, origin_epoch = epoch_origin
  epochs, batch = divmod(step - origin_step, steps_per_epoch)
  return origin_epoch + epochs, batch


def shuffle_seed(seed: int, epoch: int) -> int:
  """The tf.data shuffle seed of an epoch: a new order every epoch, fixed by the seed."""
  return seed * 1_000_003 + epoch
