"""lmms-eval integration: ``lmms-eval --model vlprune --model_args pretrained=...,visual_keep=64``.

The model class lives in :mod:`vlprune.lmms.model` (it imports lmms-eval); this module only
names it, so that lmms-eval can list its models without importing torch models. lmms-eval
finds it through the ``lmms_eval.models`` entry point of this package (``pip install
'vlprune[lmms]'``).
"""

from __future__ import annotations

__all__ = ["MODEL_CLASS", "MODEL_ID", "manifests"]

#: the name given to ``lmms-eval --model``
MODEL_ID = "vlprune"
#: the lmms-eval model class (a simple, generation-only model)
MODEL_CLASS = "vlprune.lmms.model.VLPruneLMM"


def manifests() -> list:
    """The ``ModelManifest`` list lmms-eval's registry loads from the entry point."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)]
