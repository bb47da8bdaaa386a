"""Training: the state and the jitted steps, and the loop that runs them.

- ``state``: the train state and its weight EMA; ``step_functions``: the jitted train and
  eval steps (SAM, distillation, k steps per dispatch); ``optimizers`` and ``schedules``.
- ``build``: the model, train state and step options of a config; ``prepare``: a whole
  run (data, state resumed or warm-started by ``warm_start``, evaluators).
- ``timeline``: epochs, steps and fractions of training as steps; ``dispatch``: what each
  step calls for and how steps are dispatched; ``loop``: the loop itself.
- ``evaluation``: evaluators and the eval mode; ``preemption``: SIGTERM and Ctrl-C.
"""
