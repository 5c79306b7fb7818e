"""synthgen: fast, reproducible synthetic tumors for abdominal CT.

Plan, then render: :func:`plan` samples every random choice of a sample into a small,
JSON-serialisable :class:`Plan`; :func:`render` applies it deterministically;
:func:`synthesize` does both; presets that enable ``[mass_effect]`` first warp the scan and its
labels around large tumors (:mod:`synthgen.mass_effect`), replayed from the plan too. Presets
for pancreas, liver, kidney, colon, esophagus and uterus (plus ``liver-classic``, the
published recipe) live in :mod:`synthgen.presets`.
"""

from __future__ import annotations

from ._device import DeviceError
from ._pool import set_num_threads
from .api import SynthesisResult, Synthesizer, render, render_batch, synthesize
from .planning import ControlGrid, OrganIndex, Plan, TumorPlan, index_organ
from .planning import make_plan as plan
from .presets import Preset, PresetError, list_presets, load_preset
from .rendering import RenderResult, TumorRecord

__version__ = "0.1.0"

__all__ = [
    "ControlGrid",
    "DeviceError",
    "OrganIndex",
    "Plan",
    "Preset",
    "PresetError",
    "RenderResult",
    "SynthesisResult",
    "Synthesizer",
    "TumorPlan",
    "TumorRecord",
    "__version__",
    "index_organ",
    "list_presets",
    "load_preset",
    "plan",
    "render",
    "render_batch",
    "set_num_threads",
    "synthesize",
]


def __getattr__(name: str):
    # `synthgen.phantom` is imported on first use (it is not needed to synthesize).
    if name == "phantom":
        import importlib

        return importlib.import_module(".phantom", __name__)
    raise AttributeError(f"module 'synthgen' has no attribute {name!r}")
