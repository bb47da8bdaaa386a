"""ResNet-50 on ImageNet with FFCV's short recipe (Leclerc et al. 2022): 73.8% top-1 in 16
epochs (75.6% in 24, 78.4% in 88; set num_epochs and move the resizing ramp with it).

SGD 1.7 at batch 4096 (FFCV's rn50 configs: 512 per GPU on 8 GPUs, so 0.106 per 256;
here batch 1024 with the rate scaled linearly, 0.425), weight decay 1e-4 (5e-5 for
ResNet-18), label smoothing 0.1, a triangular-like schedule (OneCycle peaking at epoch
2), progressive resizing 160 -> 192 px over epochs 11-13, evaluation at 256 px (centre
crop 224/256) with horizontal-flip test-time augmentation; bf16. Not reproduced:
FFCV's BlurPool and its JPEG decoding at the low resolution (here images are decoded at
192 and resized on the device).
"""

from configs import resnet50_imagenet


def get_config():
  config = resnet50_imagenet.get_config()
  config.image_size = 192
  config.progressive_resizing_sizes = (160, 192)
  config.progressive_resizing_epochs = (11, 13)
  config.eval_image_size = 256
  config.eval_flip = True
  config.batch_size = 1024
  config.num_epochs = 16
  config.learning_rate = 1.7 * 256 / 4096  # per 256 images: FFCV's 1.7 at batch 4096
  config.weight_decay = 1e-4
  config.label_smoothing = 0.1
  config.onecycle_pct_start = 2 / 16
  return config
