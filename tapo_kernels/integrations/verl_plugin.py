"""Importing this module registers the TAPO losses and advantage estimator with verl.

For verl's hooks that import a module in each process: the actor's
``actor_rollout_ref.model.external_lib=tapo_kernels.integrations.verl_plugin`` or the
environment variable ``VERL_USE_EXTERNAL_MODULES=tapo_kernels.integrations.verl_plugin``.
"""

from .verl import register

register()
