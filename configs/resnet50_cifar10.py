"""ResNet-50 (CIFAR stem) on CIFAR-10: Nesterov SGD, warm-up + cosine, dropout 0.2."""

from configs import cifar10_base


def get_config():
  config = cifar10_base.get_config()
  config.model = 'resnet50'
  config.model_options.stem = 'cifar'
  config.nesterov = True
  config.weight_decay = 5e-4
  config.num_epochs = 200
  config.schedule = 'cosine'
  config.warmup_epochs = 5.0
  config.dropout_rate = 0.2
  return config
