"""Import hook for verl: importing this module registers the mtgrpo policy loss, advantage
estimator and sampler hook (:func:`mtgrpo_core.integrations.verl.register`), and the fused
versions of verl's "vanilla", "cispo", "sapo", "gpg" and "geo_mean" policy losses under
verl's own names (``FUSED_POLICY_LOSSES``; verl's originals in ``ORIGINAL_POLICY_LOSSES``).

Name it in verl's own plugin variable so every Ray process that imports verl registers too::

    +ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=mtgrpo_core.integrations.verl_plugin
"""
from .verl import register

INFO = register()
