"""``load_dataset``: the configured data set for this process, as tf.data sources.

One module per source: ``digits`` (scikit-learn's embedded digits), ``tfds_source``
(any tensorflow-datasets name) and ``folder`` (class sub-folders of images). Each
process holds only its own share of the examples, except the small embedded set,
which every process holds whole (``replicated_train``). Eval, export and predict ask
for the eval split alone (``splits=('eval',)``), so they never read training data.
"""

import dataclasses
from collections.abc import Callable, Sequence

import ml_collections

from jax_resnet.data.common import EMBEDDED_DATASETS, FOLDER, DatasetInfo
from jax_resnet.data.tf_cpu import tf


@dataclasses.dataclass
class Dataset:
  """A data set's splits on this process plus what the model needs to know of it.

  ``train`` holds this process's raw examples (decoded images, encoded bytes or file
  paths); ``train_transform(example, seed)`` turns one into {'image' uint8, 'label'
  int32}, stateless in ``seed``. ``eval`` is ready to batch. A split that was not asked
  for is None.
  """

  info: DatasetInfo
  train: tf.data.Dataset | None
  eval: tf.data.Dataset | None
  train_transform: Callable | None = None
  decodes: bool = False  # the transforms decode files: undecodable ones are dropped
  num_skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # bad files
  # Every process holds the whole (small) train split and takes its rows of each global
  # batch, so the global batches do not depend on the number of processes.
  replicated_train: bool = False


def load_dataset(
  config: ml_collections.ConfigDict,
  workdir: str | None = None,
  splits: Sequence[str] = ('train', 'eval'),
  class_names: Sequence[str] = (),
) -> Dataset:
  """The configured data set's ``splits``.

  ``workdir`` receives (and, for an eval-only folder set, provides) the files that
  describe the data (the class index); ``class_names`` (a checkpoint's) names the
  classes of a folder set loaded without its training split.
  """
  if config.dataset in EMBEDDED_DATASETS:
    from jax_resnet.data import digits as source
  elif config.dataset == FOLDER:
    from jax_resnet.data import folder as source
  else:
    from jax_resnet.data import tfds_source as source
  dataset = source.load(config, workdir, tuple(splits), tuple(class_names))
  return with_threads(dataset, config.input_threads or default_input_threads())


def default_input_threads() -> int:
  """This process's cores (its affinity, as SLURM or taskset set it) divided by the
  processes on its host, at least one; 0 (tf.data's shared pool, every core) for the only
  process on its host, where a private pool only made the default job slower."""
  import os

  from jax_resnet import parallel

  processes = parallel.processes_on_this_host()
  if processes == 1:
    return 0
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return max(1, cores // processes)


def with_threads(dataset: Dataset, threads: int) -> Dataset:
  """``dataset`` whose pipelines run on a private pool of ``threads`` threads (0: as it
  is, on tf.data's shared pool)."""
  if not threads:
    return dataset
  options = tf.data.Options()
  options.threading.private_threadpool_size = int(threads)
  sized = lambda ds: None if ds is None else ds.with_options(options)
  return dataclasses.replace(dataset, train=sized(dataset.train), eval=sized(dataset.eval))
