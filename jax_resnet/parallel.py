"""Data parallelism on a one-axis device mesh: the only place batches meet devices.

Parameters and optimizer state are replicated; the global batch is split along the
``data`` axis over every device of every host. Because jitted code sees global arrays,
BatchNorm's batch mean is taken over the global batch (synchronised BN) for free.
"""

import collections
import itertools
from collections.abc import Iterable, Iterator

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_resnet.errors import ConfigError

DATA_AXIS = 'data'


def create_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """This process's share of a global batch (``validation.validate`` checked that it
  splits evenly over the mesh's devices)."""
  assert global_batch_size % mesh.devices.size == 0, (global_batch_size, mesh.devices.size)
  return global_batch_size // jax.process_count()


def to_global(batch, mesh: Mesh):
  """Process-local numpy batch -> global jax.Arrays split along the batch axis."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
  )


def prefetch_to_device(batches: Iterable, mesh: Mesh, size: int = 2) -> Iterator:
  """Keeps ``size`` batches in flight, so the next copy overlaps the current step."""
  queue = collections.deque()
  iterator = iter(batches)
  for batch in itertools.islice(iterator, size):
    queue.append(to_global(batch, mesh))
  while queue:
    yield queue.popleft()
    for batch in itertools.islice(iterator, 1):
      queue.append(to_global(batch, mesh))


# The PJRT plugins of jax's accelerator extras (jax[cuda13], jax[cuda12], jax[tpu], ROCm),
# by the module each installs.
ACCELERATOR_PLUGINS = {
  'jax_cuda13_plugin': 'CUDA 13',
  'jax_cuda12_plugin': 'CUDA 12',
  'libtpu': 'TPU',
  'jax_rocm7_plugin': 'ROCm',
  'jax_rocm60_plugin': 'ROCm',
}


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> bool:
  """Starts JAX's multi-controller runtime when this is one of several processes; whether
  it did.

  Explicit arguments or the JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID
  variables win; otherwise a SLURM job step of several tasks and a multi-host TPU pod are
  detected by jax.distributed itself (SLURM: from SLURM_JOB_ID, SLURM_STEP_NODELIST,
  SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID, with no flags).
  """
  import os

  address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  num = num_processes or int(os.environ.get('JAX_NUM_PROCESSES', 0)) or None
  if process_id is None and 'JAX_PROCESS_ID' in os.environ:
    process_id = int(os.environ['JAX_PROCESS_ID'])
  slurm = int(os.environ.get('SLURM_NTASKS', '1')) > 1
  tpu_pod = bool(os.environ.get('TPU_WORKER_HOSTNAMES', '').count(','))
  if not (address or slurm or tpu_pod):
    return False
  # CPU processes exchange collectives through gloo; GPUs and TPUs ignore this.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if address:
    jax.distributed.initialize(
      coordinator_address=address, num_processes=num, process_id=process_id
    )
  else:
    jax.distributed.initialize()
  logging.info(
    'Process %d of %d, %d local devices of %d.',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True


def processes_on_this_host() -> int:
  """How many of the job's processes run on this host (one per GPU, typically); a
  collective: every process calls it."""
  if jax.process_count() == 1:
    return 1
  import socket
  import zlib

  from jax.experimental import multihost_utils

  mine = zlib.crc32(socket.gethostname().encode())
  hosts = np.asarray(multihost_utils.process_allgather(np.array(mine, np.int64)))
  return int(np.sum(hosts == mine))


def describe_devices(devices=None) -> str:
  """'8 x NVIDIA H100 80GB HBM3 (gpu)': what a run is about to use, for the start-up log."""
  devices = jax.devices() if devices is None else devices
  kinds = sorted({d.device_kind for d in devices})
  return f'{len(devices)} x {", ".join(kinds)} ({devices[0].platform})'


def unused_accelerator_plugins(devices=None) -> list[str]:
  """The accelerator plugins installed while JAX runs on the CPU anyway (a driver too old
  for the plugin, no device visible, ...): each an install that is silently not used."""
  import importlib.util

  devices = jax.devices() if devices is None else devices
  if devices[0].platform != 'cpu':
    return []
  return [
    name
    for module, name in ACCELERATOR_PLUGINS.items()
    if importlib.util.find_spec(module) is not None
  ]


def round_up_to_devices(global_batch_size: int, device_count: int) -> int:
  """The smallest multiple of ``device_count`` at least ``global_batch_size``."""
  return -(-global_batch_size // device_count) * device_count


def check_divisible(global_batch_size: int, device_count: int, field: str) -> None:
  """A global batch must split evenly over the devices; the error suggests a size."""
  if global_batch_size <= 0 or global_batch_size % device_count:
    suggestion = max(1, round(global_batch_size / device_count)) * device_count
    raise ConfigError(
      f'config.{field}={global_batch_size} must be a positive multiple of the device '
      f'count {device_count} ({jax.process_count()} process(es) x '
      f'{jax.local_device_count()} local devices). Try --config.{field}={suggestion}.'
    )
