"""ResNet-20 on CIFAR-10, He et al. 2015 recipe (Table 6: 91.25%)."""

from configs import cifar10_base


def get_config():
  config = cifar10_base.get_config()
  config.model = 'resnet20'
  return config
