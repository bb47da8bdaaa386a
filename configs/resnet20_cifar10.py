"""ResNet-20 on CIFAR-10 (He et al. 2015, Table 6: 91.25%), with a OneCycle schedule."""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = 'cifar10'
  config.image_size = 32
  config.random_crop_pad = 4
  config.random_flip = True
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 60
  config.learning_rate = 0.2
  config.weight_decay = 1e-4
  config.log_every_steps = 100
  config.eval_every_epochs = 5.0
  return config
