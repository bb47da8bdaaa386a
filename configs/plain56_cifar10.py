"""Plain-56 on CIFAR-10: deeper plain nets train worse (He et al. 2015, Figure 6 left)."""

from configs import cifar10_base


def get_config():
  config = cifar10_base.get_config()
  config.model = 'plain56'
  return config
