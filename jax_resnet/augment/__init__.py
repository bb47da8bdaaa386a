"""On-device augmentation, inside the jitted train step: the host ships uint8 images.

- ``image_ops``: normalisation, Cutout, random erasing, pad-and-crop and flips.
- ``randaugment``: RandAugment and TrivialAugment-Wide (torchvision's 14 ops).
- ``mixing``: Mixup and CutMix with timm's semantics.
- ``pipeline``: the order the train step applies them in, and their options.
"""
