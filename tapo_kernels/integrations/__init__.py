"""Adapters that run tapo-kernels inside other RL frameworks.

Each adapter is a submodule; importing this package imports no framework:

* ``tapo_kernels.integrations.verl``: TAPO policy losses (``tapo_grpo``, ``tapo_gspo``,
  ``tapo_sapo``) in verl's policy-loss registry and the ``tapo_grpo`` advantage estimator
  (GRPO outcome advantages, then the TAPO lift from the tool-call spans of the agent loop);
  ``tapo_kernels.integrations.verl_agent_loop``: verl's tool agent loop, recording the spans.
* ``tapo_kernels.integrations.trl``: ``TapoGRPOTrainer``, TRL's ``GRPOTrainer`` with the loss
  computed by ``tapo_kernels.policy_loss`` and the TAPO lift on the tool calls of its
  completions.

The framework-free part (finding the tool calls of a completion, turning them into
``ToolCalls`` and correcting the advantages) is ``tapo_kernels.integrations.calls``.
"""
