"""Integrations with other RL stacks, without forking them.

* :mod:`mtgrpo_core.integrations.verl` (extra ``[verl]``, verl 0.9.1): the ``"mtgrpo"``
  policy loss and ``"mtgrpo_grpo"`` advantage estimator in verl's registries, MT-GRPO task
  and Prompt-GDRO bin samplers; :mod:`~mtgrpo_core.integrations.verl_plugin` registers on
  import (for ``VERL_USE_EXTERNAL_MODULES``).
* :mod:`mtgrpo_core.integrations.trl` (extra ``[trl]``, TRL 1.16): ``MTGRPOTrainer``, a
  ``GRPOTrainer`` whose loss is :func:`mtgrpo_core.grpo_loss` and whose batches are
  task-weighted and ratio-preserving.

* :func:`completion_logprobs` (:mod:`mtgrpo_core.integrations.logprobs`, torch only): the
  fused LM head + log-probs kernel for any stack, through the (DDP-)wrapper's forward.

The verl and TRL submodules are not imported by ``import mtgrpo_core`` or by this package;
import the one you need.
"""
from .logprobs import completion_logprobs, unwrap_model

__all__ = ["completion_logprobs", "unwrap_model"]
