"""ResNet-34 with custom (narrow) widths on CIFAR-10: `resnet26_small_cifar10`'s recipe
(the CIFAR-10 study under 5 M parameters; its ResNet-50: 95.59% after 300 epochs) with
the 34-layer model (the study's 4,348,082 parameters, see jax_resnet/models/registry.py).
"""

from configs import resnet26_small_cifar10


def get_config():
  config = resnet26_small_cifar10.get_config()
  config.model = 'resnet34_small'
  return config
