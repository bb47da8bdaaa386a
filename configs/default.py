"""The default job: ResNet-20 on scikit-learn's embedded digits, offline, in minutes.

Every config field is declared once, with its default and meaning, in
``jax_resnet/configuration/defaults.py`` (inside the package, so that a checkpoint written by an
older version, which lacks newer fields, can be read with their defaults). This is the
config main.py loads when no --config is given; the experiment configs import it and
change a few fields.
"""

from jax_resnet.configuration.defaults import get_config  # noqa: F401
