"""Adapters that plug sdrpn into other tools: the lmms-eval model `sdrpn_llava`
(``sdrpn.integrations.lmms_eval``, needs the `eval` extra) and the paper's results table
(``sdrpn.integrations.paper``). Importing this package imports neither lmms-eval nor a model."""

from __future__ import annotations

LMMS_EVAL_MODEL = "sdrpn_llava"
LMMS_EVAL_CLASS = "sdrpn.integrations.lmms_eval.SDRPNLlavaEval"


def lmms_eval_manifest():
    """The entry point of the group "lmms_eval.models" (pyproject.toml): lmms-eval calls it
    while it builds its model registry, and imports the class only when the model is asked
    for, so other lmms-eval runs never load sdrpn's model code."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=LMMS_EVAL_MODEL, simple_class_path=LMMS_EVAL_CLASS)
