"""jax_resnet: a high-throughput ResNet trainer in JAX/Flax."""
