"""NumPyro reparameterizers for a ``Plan``: learned conditional offsets and non-centring.

``ConditionalOffsetReparam`` follows NumPyro's ``Reparam.__call__(name, fn, obs)`` contract.
An offset needs the values of earlier sites, which the stock ``numpyro.handlers.reparam``
handler does not pass to a ``Reparam``; ``apply_config`` is NumPyro's ``reparam`` handler that
also records them. Applying a plan by hand::

    reparam_model = apply_config(model, build_config(plan))

``autoreparam.reparameterize(model)`` and ``@autoreparam.auto`` do that for a plan they make (or
check) on the model's first call, with names that do not collide with the model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple

import jax.numpy as jnp
import numpyro
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.util import validate_sample
import numpyro.distributions as dist
from numpyro.infer.reparam import Reparam
from numpyro.primitives import _PYRO_STACK, Messenger

from .names import fresh_name
from .distributions import AutoreparamShifted
from .errors import InputError
from .plan import Plan, PlanError, SitePlan
from .trace import LOC_SCALE_FAMILIES, unwrap_distribution

__all__ = ["ConditionalOffsetReparam", "ReparamConfig", "apply_config", "build_config", "record_values"]

# The laws non-centred by their Cholesky factor (``scale_tril``; plan.MVN_FAMILIES by name).
MVN_LAWS = (dist.MultivariateNormal, dist.LowRankMultivariateNormal)


class SiteValues(dict):
    """Values of the sites seen so far in the current model run (filled by ``apply_config``).

    It also carries what a ``ConditionalOffsetReparam`` needs from the site's message that
    NumPyro's ``reparam`` handler does not pass on: the ``sample_shape``, and (for the
    decentred site of a non-centred one) the law to put in its place.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.active = False  # True while a model runs under a handler that fills this store
        self.introduced: dict[str, str] = {}  # name a Reparam introduces -> the site it reparameterizes
        self.sample_shapes: dict[str, tuple] = {}
        # decentred site -> its law given (sampler, jacobian_weight=...), made by the Reparam
        self.decentred: dict[str, Callable] = {}
        self.busy = 0  # > 0 while a Reparam draws its own sites

    def reset(self):
        self.clear()
        self.sample_shapes.clear()
        self.decentred.clear()
        self.busy = 0

    def open(self):
        """Start a model run."""
        self.reset()
        self.active = True

    def close(self):
        """End a model run, dropping its values (maybe tracers)."""
        self.reset()
        self.active = False

    def see(self, msg):
        """Before the site is reparameterized: its ``sample_shape``, and a decentred site's law."""
        name = msg.get("name")
        if msg["type"] in ("sample", "param", "deterministic", "plate") and name in self.introduced \
                and not self.busy:
            raise PlanError(f"the model has its own {msg['type']} site '{name}', a name the reparameterization "
                            f"of site '{self.introduced[name]}' also uses; apply the plan with "
                            "autoreparam.reparameterize(model, plan), which picks fresh names")
        if msg["type"] != "sample":
            return
        self.sample_shapes[name] = tuple(msg["kwargs"].get("sample_shape", ()))
        law = self.decentred.pop(name, None)
        if law is not None:
            # The decentred value's density is the original one at a(z) times the Jacobian |da/dz|
            # once: the model's scale and mask weigh the original density only. A subsampled plate
            # stands for its whole size, so there the Jacobian is scaled like the density (an
            # unbiased estimate of the full model's log joint).
            scale = msg.get("scale")
            weight = _subsample_weight(msg["cond_indep_stack"])
            msg["fn"] = law(msg["fn"], jacobian_weight=weight if scale is None else weight / scale)

    def record(self, msg):
        """After the site: its value, for the offsets of later sites."""
        if msg["type"] not in ("sample", "deterministic"):
            return
        self[msg["name"]] = msg["value"]


class _RecordsValues:
    """Opens its ``SiteValues`` for each model run; shows it every site before (``see``) and after
    (``record``) the messengers below it."""

    store: SiteValues

    def __enter__(self):
        self.store.open()
        return super().__enter__()

    def __exit__(self, *exc):
        self.store.close()
        return super().__exit__(*exc)

    def process_message(self, msg):
        self.store.see(msg)
        super().process_message(msg)

    def postprocess_message(self, msg):
        self.store.record(msg)


class apply_config(_RecordsValues, handlers.reparam):
    """NumPyro's ``reparam`` handler for a ``ReparamConfig``, also recording the site values its
    offsets need.

    It sits inside the model's own handlers (its plates, ``scale`` and ``mask``), so it sees
    each site as they left it.

    >>> plan = Plan("model", (SitePlan("a", (), (), (Offset("mu", SparseMap((1, 1), (0,), (0,), (1.0,)),
    ...                                                  SparseMap((1, 1), (0,), (0,), (1.0,)), (-0.5,)),)),))
    >>> def model():
    ...     mu = numpyro.sample("mu", dist.Normal(0, 1))
    ...     return numpyro.sample("a", dist.Normal(mu, 1))
    >>> tr = handlers.trace(handlers.seed(apply_config(model, build_config(plan)), 0)).get_trace()
    >>> [(name, site["type"]) for name, site in tr.items()]
    [('mu', 'sample'), ('a_offset_mu', 'param'), ('a_base', 'sample'), ('a', 'deterministic')]
    """

    def __init__(self, fn=None, config: "ReparamConfig | None" = None):
        if not isinstance(config, ReparamConfig):
            raise InputError(f"apply_config: config must be a ReparamConfig (see build_config), got "
                             f"{type(config).__name__}")
        super().__init__(fn, config=config)
        self.store = config.store


class record_values(_RecordsValues, Messenger):
    """Record the values of the sites, for a ``ReparamConfig`` applied by NumPyro's own ``reparam``.

    The older spelling of ``apply_config(model, config)``:
    ``numpyro.handlers.reparam(config.record(model), config=config)``.
    """

    def __init__(self, fn=None, store: SiteValues | None = None):
        super().__init__(fn)
        self.store = SiteValues() if store is None else store


def _subsample_weight(frames) -> float:
    """The product of ``size / subsample_size`` over the subsampled plates a site sits in."""
    plates = {m.name: m for m in _PYRO_STACK if isinstance(m, numpyro.plate)}
    weight = 1.0
    for frame in frames:
        plate = plates.get(frame.name)
        if plate is not None and plate.subsample_size != plate.size:
            weight *= plate.size / plate.subsample_size
    return weight


class ReparamConfig(dict):
    """The reparam config of a plan (site name -> ``Reparam``); apply it with ``apply_config``.

    ``store`` holds the site values of the current run, which the offsets read; ``plan`` is the
    plan the config was built from.
    """

    def __init__(self, *args, store: SiteValues, plan: Plan, **kwargs):
        super().__init__(*args, **kwargs)
        self.store = store
        self.plan = plan

    def record(self, model: Callable) -> Callable:
        """``model`` recording site values for ``handlers.reparam(..., config=self)`` (``apply_config``
        does both in one handler)."""
        return record_values(model, store=self.store)


def _expand_batch(x, event_ndim: int):
    """Append ``event_ndim`` unit dims so a batch-shaped array broadcasts against the site's shape."""
    return jnp.reshape(x, jnp.shape(x) + (1,) * event_ndim)


@dataclass(frozen=True)
class SiteNames:
    """The sites and params a reparameterized site introduces (fresh in the model's namespace)."""

    base: str
    decentred: str  # NumPyro's LocScaleReparam names this site {a}_decentered
    centredness: str  # and this param {a}_centered
    offsets: tuple[tuple[str, str], ...] = ()  # (parent, param name)

    @classmethod
    def default(cls, name: str, parents=()) -> "SiteNames":
        return cls(f"{name}_base", f"{name}_decentered", f"{name}_centered",
                   tuple((p, f"{name}_offset_{p}") for p in parents))

    def offset(self, parent: str) -> str:
        return dict(self.offsets)[parent]


class ConditionalOffsetReparam(Reparam):
    """``a = a_base + sum_P xi_{a|P} * G_{a|P}(P)`` with ``a_base ~ p_a(. + offset)``.

    The change of variables has unit Jacobian, so the model's posterior is unchanged. With
    ``learn=True``, ``xi = init + xi_step * {a}_offset_{P}`` where ``{a}_offset_{P}`` is a
    ``numpyro.param`` starting at zero (``xi_step`` is 1 for ``init="zero"`` and small for the
    analytic start, see ``Plan.xi_step``); with ``learn=False`` xi stays at its initial value.
    Parents enter relative to the plan's ``anchors`` (the point where xi was measured).
    With ``site.centredness`` set, the shifted distribution is further decentred as NumPyro's
    ``LocScaleReparam`` does (latent ``{a}_decentered``; learned centredness ``{a}_centered``),
    for every family in ``LOC_SCALE_FAMILIES``, with the Jacobian counted once under the
    model's ``scale`` and ``mask`` handlers (see ``record_values``). The names are those of
    ``names`` (fresh ones when a model already uses ``{a}_base`` and the like).
    """

    def __init__(self, site: SitePlan, store: SiteValues, learn: bool = True, anchors: dict | None = None,
                 xi_step: float = 1.0, names: SiteNames | None = None):
        self.site = site
        self.store = store
        self.learn = learn
        self.anchors = anchors or {}
        self.xi_step = xi_step
        self.names = names or SiteNames.default(site.name, site.parents)

    def __repr__(self) -> str:
        return (f"ConditionalOffsetReparam(site={self.site.name!r}, parents={self.site.parents!r}, "
                f"noncentred={self.site.noncentred})")

    def __call__(self, name, fn, obs):
        site = self.site
        if obs is not None:
            raise PlanError(f"{type(self).__name__}: site '{name}' is observed; only latent sites can be "
                            "reparameterized")
        if not self.store.active:
            raise PlanError(f"site '{name}' is reparameterized by a config that does not see the model's "
                            "sites: apply the config with autoreparam.reparam.apply_config(model, config)")
        sample_shape = self.store.sample_shapes.pop(name, ())
        if sample_shape:  # numpyro.sample(..., sample_shape=...) outside a plate: the same law, expanded
            fn = fn.expand(tuple(sample_shape) + tuple(fn.batch_shape))
        support = fn.support.base_constraint if isinstance(fn.support, constraints.independent) else fn.support
        if support is not constraints.real:
            raise PlanError(f"{type(self).__name__}: site '{name}' has support {fn.support}; offsets and "
                            "non-centring need real support")
        shape, event_ndim = tuple(fn.shape()), len(fn.event_shape)
        batch = shape[:len(shape) - event_ndim]
        if shape != tuple(site.shape) or batch[len(batch) - len(site.batch_shape):] != tuple(site.batch_shape):
            raise PlanError(f"{type(self).__name__}: site '{name}' has shape {shape} in the model but "
                            f"{tuple(site.shape)} in the plan; re-run the analysis on these inputs")
        if site.sample_ndim and site.sample_ndim != len(sample_shape):
            # Not read here, but the emitter places the batch after these dims: a wrong value (sizes that
            # coincide pass SitePlan.check) would emit another model. 0 is also what older plans say.
            raise PlanError(f"{type(self).__name__}: site '{name}' is drawn with sample_shape {tuple(sample_shape)} "
                            f"in the model ({len(sample_shape)} sample dims) but the plan's sample_ndim is "
                            f"{site.sample_ndim}; re-run the analysis on these inputs")
        self.store.busy += 1
        try:
            return None, self._value(name, fn, shape, event_ndim)
        finally:
            self.store.busy -= 1

    def _value(self, name, fn, shape, event_ndim):
        site, names = self.site, self.names
        dtype = jnp.result_type(float)
        # Offsets from the recorded values of earlier sites.
        offset = None
        for off in site.offsets:
            if off.parent not in self.store:
                raise PlanError(f"site '{name}' has offset parent '{off.parent}', which is not sampled "
                                f"before '{name}' in the model")
            xi = jnp.reshape(jnp.asarray(off.init, dtype=dtype), site.batch_shape)
            if self.learn:
                # xi = init + step * param: a small step keeps Adam's noisy updates of xi (the
                # valley noise again) from undoing a good analytic start; step 1 learns xi directly.
                xi = xi + self.xi_step * numpyro.param(names.offset(off.parent), jnp.zeros_like(xi))
            parent_value = self.store[off.parent]
            if off.parent in self.anchors:
                anchor = jnp.asarray(self.anchors[off.parent], dtype=jnp.result_type(parent_value))
                parent_value = parent_value - jnp.reshape(anchor, jnp.shape(parent_value))
            term = _expand_batch(xi, event_ndim) * off.absorb(parent_value, shape)
            offset = term if offset is None else offset + term

        if not site.noncentred:
            # Draw the base value with density p_a(a_base + offset): unit Jacobian.
            shifted = fn if offset is None else shift_distribution(self, fn, -offset)
            base_value = numpyro.sample(names.base, shifted)
            return base_value if offset is None else base_value + offset

        # Non-centre the shifted law: z ~ F(c loc, scale^c), a = loc + scale^(1-c) (z - c loc) + offset.
        core = unwrap_distribution(fn)
        if isinstance(core, MVN_LAWS) != site.cholesky:
            raise PlanError(f"site '{name}' is {type(core).__name__}: " + (
                f"a {type(core).__name__} is non-centred only by its Cholesky factor (SitePlan cholesky=True; "
                f"plan.with_centredness({name!r}, 0.0, cholesky=True))"
                if not site.cholesky else "cholesky non-centring is for MultivariateNormal and "
                "LowRankMultivariateNormal sites only"))
        if site.cholesky:
            return self._noncentre_mvn(name, fn, core, shape)
        if not isinstance(core, LOC_SCALE_FAMILIES):
            raise PlanError(f"site '{name}' is {type(core).__name__}, not one of the loc-scale families "
                            f"({', '.join(f.__name__ for f in LOC_SCALE_FAMILIES)}); it cannot be non-centred")
        centredness = jnp.reshape(jnp.asarray(site.centredness, dtype=dtype), site.batch_shape)
        if self.learn and site.learn_centredness:
            centredness = numpyro.param(names.centredness, centredness, constraint=constraints.unit_interval)
        c = jnp.broadcast_to(_expand_batch(centredness, event_ndim), shape)
        loc = jnp.broadcast_to(core.loc, shape)
        scale = jnp.broadcast_to(core.scale, shape)
        # log(scale) before the broadcast: one log per distinct scale (often one per site), and
        # scale ** -c and the log-Jacobian from it, rather than a pow and a log per element.
        log_core_scale = jnp.log(core.scale)
        log_scale = jnp.broadcast_to(log_core_scale, shape)
        centre = loc if offset is None else loc - offset  # the loc of the shifted law
        others = {k: getattr(core, k) for k in core.arg_constraints if k not in ("loc", "scale")}
        decentred = type(core)(loc=c * centre, scale=scale ** c, **others)
        if event_ndim:
            decentred = decentred.to_event(event_ndim)
        recentre = Recentring(loc=loc, scale=scale, c_centre=c * centre, inverse_scale_c=jnp.exp(-c * log_scale))
        standard = _with_core(fn, StandardizedCore(core, log_core_scale))
        self.store.decentred[names.decentred] = partial(DecentredLaw, standard=standard, recentre=recentre,
                                                        log_factor=(1.0 - c) * log_scale, event_ndim=event_ndim)
        try:
            z = numpyro.sample(names.decentred, decentred)
        finally:
            self.store.decentred.pop(names.decentred, None)
        return recentre.value(z)

    def _noncentre_mvn(self, name, fn, core, shape):
        """``z ~ Normal(0, 1)`` per coordinate, ``a = loc + scale_tril @ z`` (``SitePlan.check``: no offsets)."""
        loc = jnp.broadcast_to(core.loc, shape)
        scale_tril = jnp.broadcast_to(core.scale_tril, shape + shape[-1:])
        # The site's own event dims (a MultivariateNormal .to_event(k) has k + 1), so that the
        # decentred law has the site's batch shape.
        standard = dist.Normal(jnp.zeros(shape, loc.dtype), 1.0).to_event(fn.event_dim)
        decentred = self.names.decentred
        self.store.decentred[decentred] = partial(DecentredMVNLaw, target=fn, scale_tril=scale_tril, loc=loc)
        try:
            z = numpyro.sample(decentred, standard)
        finally:
            self.store.decentred.pop(decentred, None)
        return loc + _tril_apply(scale_tril, z)


def _tril_apply(scale_tril, z):
    return jnp.squeeze(scale_tril @ z[..., None], -1)


class _DrawsFromSampler(dist.Distribution):
    """A decentred law: draws, support and reparameterized sampling are its ``sampler``'s."""

    @property
    def support(self):
        return self.sampler.support

    @property
    def has_rsample(self):
        return self.sampler.has_rsample

    def sample(self, key, sample_shape=()):
        return self.sampler.sample(key, sample_shape)


class DecentredMVNLaw(_DrawsFromSampler):
    """The law of ``z`` whose site value is ``a = loc + scale_tril @ z`` for a MultivariateNormal site.

    ``log_prob(z) = target.log_prob(a) + jacobian_weight * log|det scale_tril|`` (see ``DecentredLaw``);
    samples are standard normal, which is what ``target`` at ``a`` times the Jacobian is when unmasked.
    """

    arg_constraints = {}
    pytree_data_fields = ("sampler", "target", "scale_tril", "loc", "jacobian_weight")

    def __init__(self, sampler, target, scale_tril, loc, jacobian_weight, *, validate_args=None):
        self.sampler, self.target = sampler, target
        self.scale_tril, self.loc, self.jacobian_weight = scale_tril, loc, jacobian_weight
        super().__init__(sampler.batch_shape, sampler.event_shape, validate_args=validate_args)

    def log_prob(self, value):
        log_jacobian = jnp.sum(jnp.log(jnp.abs(jnp.diagonal(self.scale_tril, axis1=-2, axis2=-1))), -1)
        extra = len(self.event_shape) - 1  # event dims of .to_event on the MultivariateNormal
        if extra:
            log_jacobian = jnp.sum(log_jacobian, axis=tuple(range(-extra, 0)))
        return self.target.log_prob(self.loc + _tril_apply(self.scale_tril, value)) \
            + self.jacobian_weight * log_jacobian


class Recentring(NamedTuple):
    """The site value ``a = loc + scale * u`` of a decentred value ``z``, through the standardized
    ``u = (a - loc) / scale = (z - c * centre) * scale ** -c``: the same arrays give the value (the
    model's) and the density (``DecentredLaw``), so that XLA evaluates ``u`` once for both.

    ``centre`` is the loc of the law that was decentred (the site's loc minus its offset), so that
    ``a = centre + scale ** (1 - c) * (z - c * centre) + offset``. (A tuple, so a pytree, as the
    fields of a distribution must be.)
    """

    loc: jnp.ndarray
    scale: jnp.ndarray
    c_centre: jnp.ndarray  # c * centre
    inverse_scale_c: jnp.ndarray  # scale ** -c

    def standardized(self, z):
        return (z - self.c_centre) * self.inverse_scale_c

    def value(self, z):
        return self.loc + self.scale * self.standardized(z)


class StandardizedCore(dist.Distribution):
    """A loc-scale law ``F(loc, scale)`` scored at the standardized ``u = (x - loc) / scale``:
    ``log_prob(u) = F(0, 1).log_prob(u) - log(scale)``, which is ``F(loc, scale).log_prob(x)``.

    It stands in for the site's law inside the site's own Independent/Expanded/Masked wrappers
    (``_with_core``), so that masks weigh its density as they weigh the site's.
    """

    arg_constraints = {}
    support = constraints.real
    pytree_data_fields = ("standard", "log_scale")

    def __init__(self, core, log_scale, *, validate_args=None):
        others = {k: getattr(core, k) for k in core.arg_constraints if k not in ("loc", "scale")}
        # Unvalidated: u is a function of the decentred value, which DecentredLaw validates.
        self.standard = type(core)(loc=0.0, scale=1.0, **others, validate_args=False)
        self.log_scale = log_scale
        super().__init__(core.batch_shape, core.event_shape, validate_args=validate_args)

    def log_prob(self, value):
        return self.standard.log_prob(value) - self.log_scale


def _with_core(fn, core):
    """``fn`` with its innermost law (under Independent/Expanded/Masked wrappers) replaced by ``core``."""
    if isinstance(fn, dist.Independent):
        return dist.Independent(_with_core(fn.base_dist, core), fn.reinterpreted_batch_ndims)
    if isinstance(fn, dist.ExpandedDistribution):
        return _with_core(fn.base_dist, core).expand(fn.batch_shape)
    if isinstance(fn, dist.MaskedDistribution):
        return dist.MaskedDistribution(_with_core(fn.base_dist, core), fn._mask)
    return core


class DecentredLaw(_DrawsFromSampler):
    """The law of a decentred value ``z`` whose site value is ``a = recentre.value(z)``.

    ``log_prob(z) = target.log_prob(a) + jacobian_weight * sum(log_factor)``, with
    ``log_factor = log|da/dz| = (1 - c) log(scale)``: the site's own (possibly masked) density at
    ``a``, computed as ``standard.log_prob(u)`` at the standardized ``u`` (the site's law with its
    loc-scale core replaced by a ``StandardizedCore``), plus the log-Jacobian weighted so that,
    after the model's ``scale`` multiplies the whole, it counts once (or once per element a
    subsampled plate stands for). Samples are drawn from ``sampler``, the decentred loc-scale law.
    """

    arg_constraints = {}
    pytree_data_fields = ("sampler", "standard", "recentre", "log_factor", "jacobian_weight")
    pytree_aux_fields = ("event_ndim",)

    def __init__(self, sampler, standard, recentre, log_factor, jacobian_weight, event_ndim, *,
                 validate_args=None):
        self.sampler, self.standard, self.recentre = sampler, standard, recentre
        self.log_factor, self.jacobian_weight, self.event_ndim = log_factor, jacobian_weight, event_ndim
        super().__init__(sampler.batch_shape, sampler.event_shape, validate_args=validate_args)

    @validate_sample
    def log_prob(self, value):
        log_jacobian = self.log_factor
        if self.event_ndim:
            log_jacobian = jnp.sum(log_jacobian, axis=tuple(range(-self.event_ndim, 0)))
        return self.standard.log_prob(self.recentre.standardized(value)) + self.jacobian_weight * log_jacobian


class ShiftedDistribution(AutoreparamShifted):
    """The law of ``x + delta`` for ``x ~ base`` (real support, so the Jacobian is one): the class
    the emitted files define, which also tells NumPyro whether it can be reparameterized."""

    @property
    def has_rsample(self):
        return self.base.has_rsample


def shift_distribution(reparam: Reparam, fn, delta):
    """``fn`` shifted by ``delta``: the same family with a moved loc where possible."""
    base, expand_shape, event_dim = reparam._unwrap(fn)
    if not isinstance(base, LOC_SCALE_FAMILIES):
        return ShiftedDistribution(fn, delta)
    params = {k: getattr(base, k) for k in base.arg_constraints if hasattr(base, k)}
    params["loc"] = params["loc"] + delta
    return reparam._wrap(type(base)(**params), expand_shape, event_dim)


def site_names(plan: Plan, learn: bool = True, taken=()) -> dict[str, SiteNames]:
    """The names each plan site introduces, chosen in plan order so that none is in ``taken``,
    a site or parent of the plan, or introduced by another site (``a_base``, else ``a_base_1``...)."""
    used = set(taken) | set(plan.names) | set(plan.order)
    used |= {o.parent for s in plan.sites for o in s.offsets}

    def pick(base):
        name = fresh_name(base, used)
        used.add(name)
        return name

    out = {}
    for s in plan.sites:
        default = SiteNames.default(s.name, s.parents)
        base = decentred = centredness = ""
        if s.noncentred:
            decentred = pick(default.decentred)
            if learn and s.learn_centredness:
                centredness = pick(default.centredness)
        else:
            base = pick(default.base)
        offsets = tuple((p, pick(n) if learn else n) for p, n in default.offsets)
        out[s.name] = SiteNames(base, decentred, centredness, offsets)
    return out


def build_config(plan: Plan, learn: bool = True, taken=()) -> ReparamConfig:
    """The NumPyro reparam config of a plan; apply it with ``apply_config(model, config)``.

    ``taken`` are the names the model already uses (its sites, params and plates); the sites
    and params the config introduces avoid them. Built without them, the config raises
    PlanError if the model turns out to use one of its names.
    """
    plan.check()
    store = SiteValues()
    anchors = dict(plan.anchors)
    names = site_names(plan, learn, taken)
    for site_name, n in names.items():
        introduced = [n.base, n.decentred, n.centredness] + ([p for _, p in n.offsets] if learn else [])
        store.introduced.update({x: site_name for x in introduced if x})
    return ReparamConfig({s.name: ConditionalOffsetReparam(s, store, learn, anchors, plan.xi_step, names[s.name])
                          for s in plan.sites}, store=store, plan=plan)
