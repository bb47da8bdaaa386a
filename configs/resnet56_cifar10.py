"""ResNet-56 on CIFAR-10, He et al. 2015 recipe (Table 6: 93.03%)."""

from configs import cifar10_base


def get_config():
  config = cifar10_base.get_config()
  config.model = 'resnet56'
  return config
