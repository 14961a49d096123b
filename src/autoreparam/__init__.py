"""autoreparam: find the likelihood-invariant directions of a NumPyro model and reparameterize it."""

from .analysis import analyze
from .emit import EmitResult, emit_config, emit_source
from .errors import AutoreparamError, InputError, ModelError
from .plan import Offset, Plan, PlanError, SitePlan
from .reparam import ConditionalOffsetReparam, auto, record_values, reparameterize
from .report import Funnel, Invariance, Report, Term
from .trace import Plate, Site

__all__ = [
    "analyze",
    "emit_source",
    "emit_config",
    "EmitResult",
    "auto",
    "reparameterize",
    "record_values",
    "ConditionalOffsetReparam",
    "Offset",
    "Plan",
    "PlanError",
    "SitePlan",
    "AutoreparamError",
    "Funnel",
    "InputError",
    "Invariance",
    "ModelError",
    "Plate",
    "Report",
    "Site",
    "Term",
]
__version__ = "0.1.0"
