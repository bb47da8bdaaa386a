"""ResNet-110 on CIFAR-10, He et al. 2015 recipe (Table 6: 93.57%, best of 5 runs).

As in the paper, a low rate first: the paper trains at 0.01 until the training error
is below 80% (about 400 iterations), here one epoch of linear warm-up to 0.1.
"""

from configs import cifar10_base


def get_config():
  config = cifar10_base.get_config()
  config.model = 'resnet110'
  config.warmup_epochs = 1.0
  return config
