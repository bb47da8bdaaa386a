"""Typed options filled from a config by field name.

Below the build and validation code nothing takes the ``ConfigDict``: each piece declares
a frozen dataclass of what it uses, named as the config names it, and its builder fills
it with ``from_config``. What the config does not hold (the class count, the data's mean
and std, ...) the builder gives, so no list of fields is written twice.
"""

import dataclasses

import ml_collections


def from_config(cls, config: ml_collections.ConfigDict, **given):
  """``cls(**given)`` with every other field read from the config field of its name; a
  field that is neither given nor in the config is a TypeError (a misnamed field)."""
  names = [field.name for field in dataclasses.fields(cls) if field.name not in given]
  unknown = [name for name in names if name not in config]
  if unknown:
    raise TypeError(f'{cls.__name__}: no config field {", ".join(unknown)}, and not given.')
  return cls(**{name: config[name] for name in names}, **given)
