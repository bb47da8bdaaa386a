"""ResNet-20 on CIFAR-10 (He et al.'s recipe) distilled from a trained ResNet-56 (Hinton
et al. 2015): loss = 0.5 * cross-entropy + 0.5 * T^2 KL at temperature 4.

Train the teacher first:
  python main.py --config=configs/resnet56_cifar10.py --workdir=runs/resnet56_cifar10
"""

from configs import cifar10_base


def get_config():
  config = cifar10_base.get_config()
  config.model = 'resnet20'
  config.distill_from = 'runs/resnet56_cifar10'
  config.distill_weight = 0.5
  config.distill_temperature = 4.0
  return config
