"""ResNet-20 on CIFAR-10, Keras-example style: Adam 1e-3, reduce-on-plateau, batch 32.

The Keras example (cifar10_resnet.py) reports 92.16% after 200 epochs. Its plateau
callback: factor sqrt(0.1), patience 5, minimum rate 0.5e-6; here on the training loss
averaged over each epoch.
"""

from configs import cifar10_base


def get_config():
  config = cifar10_base.get_config()
  config.model = 'resnet20'
  config.optimizer = 'adam'
  config.learning_rate = 1e-3
  config.batch_size = 32
  config.num_epochs = 200
  config.schedule = 'plateau'
  config.plateau_factor = 0.1**0.5
  config.plateau_patience = 5
  config.plateau_cooldown = 0
  config.plateau_min_scale = 0.5e-6 / 1e-3
  config.log_every_steps = 400
  return config
