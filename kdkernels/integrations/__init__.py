"""kdkernels inside the trainers people already use.

Each submodule imports its framework only when it is itself imported, so ``import kdkernels``
never needs them:

- :mod:`kdkernels.integrations.transformers`: ``KDTrainer`` (a ``transformers.Trainer`` that
  distils a teacher into the student with the fused lm_head loss) and ``kd_loss_func`` (for
  ``Trainer(compute_loss_func=...)``). Needs ``transformers`` (and its ``accelerate``).
- :mod:`kdkernels.integrations.trl`: ``generalized_jsd_loss`` with TRL GKD's semantics. Needs
  nothing beyond PyTorch.
"""
