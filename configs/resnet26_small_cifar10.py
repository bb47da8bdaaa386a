"""ResNet-26 with custom (narrow) widths on CIFAR-10, from the CIFAR-10 study under 5 M
parameters this trainer reproduces (its ResNet-50: 95.59% after 300 epochs).

Batch 64, SGD 0.05 with Nesterov momentum, weight decay 5e-4, 5 warm-up epochs then
cosine, dropout 0.2 before the head, crop and flip, 300 epochs. The study gives its
parameter counts, not its widths: resnet26_small has its 4,196,906, with widths found by
search (jax_resnet/models/registry.py).
"""

from configs import cifar10_base


def get_config():
  config = cifar10_base.get_config()
  config.model = 'resnet26_small'
  config.batch_size = 64
  config.learning_rate = 0.05
  config.nesterov = True
  config.weight_decay = 5e-4
  config.schedule = 'cosine'
  config.warmup_epochs = 5.0
  config.dropout_rate = 0.2
  config.num_epochs = 300
  return config
