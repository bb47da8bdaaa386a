"""WRN-28-10 on CIFAR-10, Zagoruyko & Komodakis 2016 (96.00%, error 4.00%, Table 4).

The Wide ResNet of depth 28 and widening factor 10 (pre-activation basic blocks, 160,
320 and 640 channels, 36.5M parameters); SGD 0.1 with Nesterov momentum 0.9, weight decay
5e-4, batch 128, 200 epochs, the rate divided by 5 at epochs 60, 120 and 160; crop and
flip. The paper's dropout variant (3.89%) is --config.block_dropout_rate=0.3; DeVries &
Taylor's Cutout variant (96.92%) is --config.cutout_size=16.
"""

from configs import cifar10_base


def get_config():
  config = cifar10_base.get_config()
  config.model = 'wrn28_10'
  config.nesterov = True
  config.weight_decay = 5e-4
  config.num_epochs = 200
  config.decay_at = (0.3, 0.6, 0.8)
  config.decay_factor = 0.2
  return config
