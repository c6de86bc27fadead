"""vlprune: training-free token reduction for vision and vision-language transformers.

    import timm, vlprune
    model = timm.create_model("vit_base_patch16_224", pretrained=True)
    vlprune.patch(model, merge_r=16)   # ToMe merging, in place
    vlprune.describe(model)            # tokens per layer and FLOPs
    vlprune.unpatch(model)             # the original model back
"""

from .adapters import UnsupportedModelError, supported_text
from .api import (
    Description,
    check,
    configure,
    describe,
    disabled,
    get_config,
    get_source,
    is_patched,
    patch,
    set_guide,
    unpatch,
)
from .calibration import Calibration, calibrate
from .config import ReductionConfig, parse_schedule
from .merging import TemporalResult, temporal_merge
from .tune import TuneResult, tune
from .version import __version__

__all__ = [
    "__version__",
    "Calibration",
    "Description",
    "ReductionConfig",
    "TemporalResult",
    "TuneResult",
    "UnsupportedModelError",
    "calibrate",
    "check",
    "configure",
    "describe",
    "disabled",
    "get_config",
    "get_source",
    "is_patched",
    "parse_schedule",
    "patch",
    "set_guide",
    "supported_text",
    "temporal_merge",
    "tune",
    "unpatch",
]
