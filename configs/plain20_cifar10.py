"""Plain-20 (ResNet-20 without shortcuts) on CIFAR-10: He et al. 2015, Figure 6 left.

With plain56_cifar10, resnet20_cifar10 and resnet56_cifar10 this gives the degradation
figure: python -m jax_resnet.observe.plot RUN_DIRS... --out degradation.png
"""

from configs import cifar10_base


def get_config():
  config = cifar10_base.get_config()
  config.model = 'plain20'
  return config
