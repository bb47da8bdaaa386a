"""The CIFAR-10 recipe of He et al. 2015 (Section 4.2), over the default config.

SGD 0.1, momentum 0.9 (no Nesterov), weight decay 1e-4, batch 128, 4-pixel pad-and-crop
plus horizontal flip, the rate divided by 10 at 50% and 75% of training: the paper's
64k iterations at 32k and 48k, i.e. 164 epochs of the 50k training images. The CIFAR
ResNets use the parameter-free "option A" shortcuts. The CIFAR experiment configs
change a few fields of this one.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = 'resnet20'
  config.dataset = 'cifar10'
  config.image_size = 32
  config.random_crop_pad = 4
  config.random_flip = True
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 164  # 64k iterations of 390 steps per epoch
  config.optimizer = 'sgd'
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.nesterov = False
  config.weight_decay = 1e-4
  config.schedule = 'multistep'
  config.decay_at = (0.5, 0.75)
  config.decay_factor = 0.1
  config.warmup_epochs = 0.0
  config.log_every_steps = 100
  config.eval_every_epochs = 4.0
  return config
