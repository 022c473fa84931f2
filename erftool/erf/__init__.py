"""The ERF engine: gradient effective receptive fields (Luo et al. 2016).

    from erftool.erf import compute_erf
    res = compute_erf(model.eval(), images, layer="layer3", rule="abs")
    res.map, res.metrics, res.rf_box; res.save("erf.npz")

Offsets policy for deformable modules: `frozen_offsets()` / `offsets_frozen()`
/ `prepare_offsets()` (see erftool.erf.offsets).
"""
from . import metrics
from .engine import compute_erf
from .offsets import (MODES as OFFSET_MODES, frozen_offsets, offset_policy, offsets_frozen,
                      offsets_mode, prepare_offsets, zero_offsets)
from .positions import PerImage, input_to_layer
from .result import ERFResult
from .rf import positive_surrogate, theoretical_rf
from .rules import RULES

__all__ = [
    "compute_erf", "ERFResult", "PerImage", "input_to_layer", "theoretical_rf",
    "positive_surrogate", "metrics", "RULES", "OFFSET_MODES", "frozen_offsets", "zero_offsets",
    "offset_policy", "offsets_frozen", "offsets_mode", "prepare_offsets",
]
