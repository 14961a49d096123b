"""autoreparam: find the likelihood-invariant directions of a NumPyro model and reparameterize it."""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

# The public names are imported on first use, so that ``import autoreparam.cli`` does not import
# JAX: the command line must be watching for Ctrl-C before JAX's import starts (a KeyboardInterrupt
# that lands in JAX's garbage-collection callback is only printed as "Exception ignored", and the
# run would go on to write its output).
_EXPORTS = {
    "analyze": "api",
    "collapsed_mcmc": "collapsed", "gibbs_mcmc": "collapsed", "CollapsedPosterior": "collapsed",
    "emit_source": "emit", "emit_config": "emit", "EmitResult": "emit",
    "AutoreparamError": "errors", "InputError": "errors", "ModelError": "errors",
    "Offset": "plan", "Plan": "plan", "PlanError": "plan", "SitePlan": "plan",
    "ConditionalOffsetReparam": "reparam", "record_values": "reparam",
    "auto": "api", "reparameterize": "api", "unwrap": "api", "auto_mcmc": "api", "choose_mcmc": "collapsed",
    "Existing": "report", "Funnel": "report", "Invariance": "report", "Report": "report", "Term": "report",
    "Plate": "trace", "Site": "trace",
    "AutoHybrid": "hybrid", "HybridELBO": "hybrid", "NaturalGradient": "natural",
    "decaying_step_size": "natural", "fit_hybrid": "fit", "HybridFit": "fit", "one_blas_thread": "threads",
}
_SUBMODULES = frozenset(m.name for m in pkgutil.iter_modules(__path__))

if TYPE_CHECKING:
    from .api import analyze, auto, auto_mcmc, reparameterize, unwrap
    from .collapsed import CollapsedPosterior, choose_mcmc, collapsed_mcmc, gibbs_mcmc
    from .emit import EmitResult, emit_config, emit_source
    from .fit import HybridFit, fit_hybrid
    from .hybrid import AutoHybrid, HybridELBO
    from .natural import NaturalGradient, decaying_step_size
    from .errors import AutoreparamError, InputError, ModelError
    from .plan import Offset, Plan, PlanError, SitePlan
    from .reparam import ConditionalOffsetReparam, record_values
    from .report import Existing, Funnel, Invariance, Report, Term
    from .threads import one_blas_thread
    from .trace import Plate, Site

__all__ = [
    "analyze",
    "collapsed_mcmc",
    "gibbs_mcmc",
    "CollapsedPosterior",
    "emit_source",
    "emit_config",
    "EmitResult",
    "auto",
    "reparameterize",
    "auto_mcmc",
    "choose_mcmc",
    "unwrap",
    "Existing",
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
    "AutoHybrid",
    "HybridELBO",
    "NaturalGradient",
    "decaying_step_size",
    "fit_hybrid",
    "HybridFit",
    "one_blas_thread",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
