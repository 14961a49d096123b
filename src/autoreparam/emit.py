"""Rewrite a model's source so it carries a plan's reparameterization (a libcst codemod).

Every ``x = numpyro.sample("x", fn)`` statement of a planned site becomes explicit NumPyro
code: the offset parameters, the offset, the sample of ``x_base`` with the shifted density and
``x = numpyro.deterministic("x", x_base + x_offset)`` (or a ``LocScaleReparam`` block for a
non-centred site). Everything else keeps its formatting byte for byte. The output imports
only jax, numpy and numpyro. Statements that cannot be rewritten safely are left as they are,
with a warning naming the site and line.
"""

from __future__ import annotations

import pprint
import re
from dataclasses import dataclass, field

import libcst as cst
import libcst.matchers as m
from libcst.metadata import MetadataWrapper, PositionProvider

from .errors import InputError
from .plan import Plan

__all__ = ["EmitResult", "emit_source", "emit_config", "MARKER"]

MARKER = "# autoreparam: reparameterized model"


@dataclass(frozen=True)
class EmitResult:
    """The rewritten source and the warnings about statements left unchanged."""

    source: str
    warnings: list[str] = field(default_factory=list)
    rewritten: tuple[str, ...] = ()


def _is_sample_call(node) -> bool:
    return m.matches(node, m.Call(func=m.Attribute(value=m.Name("numpyro"), attr=m.Name("sample")))) or \
        m.matches(node, m.Call(func=m.Name("sample")))


def _site_name(call: cst.Call) -> str | None:
    args = [a for a in call.args if a.keyword is None]
    named = [a for a in call.args if a.keyword is not None and a.keyword.value == "name"]
    node = args[0].value if args else (named[0].value if named else None)
    if isinstance(node, cst.SimpleString):
        return node.evaluated_value
    return None


def _dist_arg(call: cst.Call) -> cst.BaseExpression | None:
    positional = [a for a in call.args if a.keyword is None]
    if len(positional) >= 2:
        return positional[1].value
    for a in call.args:
        if a.keyword is not None and a.keyword.value == "fn":
            return a.value
    return None


def _has_obs(call: cst.Call) -> bool:
    return any(a.keyword is not None and a.keyword.value == "obs" for a in call.args) or \
        len([a for a in call.args if a.keyword is None]) >= 3


class _SiteRewriter(cst.CSTTransformer):
    """Rewrites the planned sample statements of one function."""

    METADATA_DEPENDENCIES = (PositionProvider,)

    def __init__(self, function: str, plan: Plan, module: cst.Module):
        super().__init__()
        self.function = function
        self.plan = plan
        self.module = module
        self.planned = set(plan.names)
        self.depth = 0  # > 0 inside the target function
        self.loops = 0
        self.found_function = False
        self.rewritten: list[str] = []
        self.warnings: list[str] = []
        self.seen_sites: set[str] = set()
        self.classes = 0
        self.variables: dict[str, str] = {}  # site name -> the variable its value is bound to
        self.nonliteral_lines: list[int] = []

    def _line(self, node) -> int:
        return self.get_metadata(PositionProvider, node).start.line

    # -- scope tracking ---------------------------------------------------------------------
    def visit_ClassDef(self, node: cst.ClassDef) -> bool:
        self.classes += 1
        return True

    def leave_ClassDef(self, original, updated):
        self.classes -= 1
        return updated

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        if self.depth == 0 and not self.classes and node.name.value == self.function:
            self.found_function = True
            self.depth = 1
            return True
        if self.depth:
            self.depth += 1
        return True

    def leave_FunctionDef(self, original, updated):
        if self.depth:
            self.depth -= 1
        return updated

    def _enter_loop(self, node) -> bool:
        if self.depth:
            self.loops += 1
        return True

    def _leave_loop(self, original, updated):
        if self.depth:
            self.loops -= 1
        return updated

    visit_For = visit_While = visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _enter_loop
    leave_For = leave_While = leave_ListComp = leave_SetComp = leave_DictComp = leave_GeneratorExp = _leave_loop

    # -- sample calls that are not simple statements: warn ----------------------------------
    def visit_Call(self, node: cst.Call) -> bool:
        if self.depth != 1 or not _is_sample_call(node):
            return True
        name = _site_name(node)
        if name is None:
            self.nonliteral_lines.append(self._line(node))
            self.warnings.append(f"line {self._line(node)}: {self.module.code_for_node(node)[:60]} has a "
                                 "non-literal site name; left unchanged (only literal site names are rewritten)")
            return True
        self.seen_sites.add(name)
        if name in self.planned and name not in self._simple_sites:
            why = "inside a loop or comprehension" if self.loops else "not bound to a simple name"
            self.warnings.append(f"line {self._line(node)}: site '{name}' is {why}; left unchanged")
        return True

    def visit_SimpleStatementLine(self, node: cst.SimpleStatementLine) -> bool:
        if self.depth == 1 and not self.loops:
            target = self._simple_assignment(node)
            if target is not None:
                self._simple_sites.add(target[1])
        if self.depth == 1:
            # A variable assigned again no longer holds its site's value.
            for name in _assigned_names(node):
                for site in [s for s, v in self.variables.items() if v == name]:
                    del self.variables[site]
            bound = _bound_site(node) if not self.loops else None
            if bound is not None:
                self.variables[bound[1]] = bound[0]
        return True

    @property
    def _simple_sites(self) -> set:
        if not hasattr(self, "_simple"):
            self._simple = set()
        return self._simple

    @staticmethod
    def _simple_assignment(node: cst.SimpleStatementLine):
        if len(node.body) != 1 or not isinstance(node.body[0], cst.Assign):
            return None
        assign = node.body[0]
        if len(assign.targets) != 1 or not isinstance(assign.targets[0].target, cst.Name):
            return None
        call = assign.value
        if not isinstance(call, cst.Call) or not _is_sample_call(call):
            return None
        name = _site_name(call)
        if name is None or _has_obs(call) or _dist_arg(call) is None:
            return None
        return assign.targets[0].target.value, name, call

    def leave_SimpleStatementLine(self, original: cst.SimpleStatementLine, updated: cst.SimpleStatementLine):
        if self.depth != 1 or self.loops:
            return updated
        found = self._simple_assignment(original)
        if found is None or found[1] not in self.planned:
            return updated
        var, site_name, call = found
        site = self.plan[site_name]
        missing = [o.parent for o in site.offsets if o.parent not in self.variables]
        if missing:
            self.warnings.append(f"line {self._line(original)}: site '{site_name}' has offset parent "
                                 f"'{missing[0]}', whose value is not bound to a simple name earlier in "
                                 f"'{self.function}'; left unchanged")
            return updated
        fn_code = self.module.code_for_node(_dist_arg(call))
        lines = _site_code(self.plan, site, var, fn_code, self.variables)
        statements = [cst.parse_statement(line) for line in lines]
        comment = cst.EmptyLine(comment=cst.Comment(
            f"# autoreparam: '{site_name}' reparameterized (exact change of variables)"))
        statements[0] = statements[0].with_changes(leading_lines=(*original.leading_lines, comment))
        statements[-1] = _with_trailing(statements[-1], original.trailing_whitespace)
        self.rewritten.append(site_name)
        return cst.FlattenSentinel(statements)


def _bound_site(node: cst.SimpleStatementLine):
    """(variable, site) for ``var = numpyro.sample("site", ...)`` or ``numpyro.deterministic``."""
    if len(node.body) != 1 or not isinstance(node.body[0], cst.Assign):
        return None
    assign = node.body[0]
    if len(assign.targets) != 1 or not isinstance(assign.targets[0].target, cst.Name):
        return None
    call = assign.value
    det = m.Call(func=m.OneOf(m.Attribute(value=m.Name("numpyro"), attr=m.Name("deterministic")),
                              m.Name("deterministic")))
    if isinstance(call, cst.Call) and (_is_sample_call(call) or m.matches(call, det)):
        name = _site_name(call)
        if name is not None:
            return assign.targets[0].target.value, name
    return None


def _assigned_names(node: cst.SimpleStatementLine) -> set[str]:
    """Names (re)bound by a statement: ``x = ...``, ``x += ...``, ``x: T = ...``, ``a, b = ...``."""
    names: set[str] = set()
    for small in node.body:
        targets = []
        if isinstance(small, cst.Assign):
            targets = [t.target for t in small.targets]
        elif isinstance(small, (cst.AugAssign, cst.AnnAssign)):
            targets = [small.target]
        for t in targets:
            names |= {n.value for n in m.findall(t, m.Name())}
    return names


def _with_trailing(stmt, trailing):
    """Move the original statement's trailing comment onto the last emitted statement."""
    if isinstance(stmt, cst.SimpleStatementLine):
        return stmt.with_changes(trailing_whitespace=trailing)
    if isinstance(stmt, cst.With) and isinstance(stmt.body, cst.IndentedBlock) and stmt.body.body:
        inner = list(stmt.body.body)
        inner[-1] = _with_trailing(inner[-1], trailing)
        return stmt.with_changes(body=stmt.body.with_changes(body=inner))
    return stmt


def _ident(name: str) -> str:
    """A Python identifier made from a site name (site names may contain any character)."""
    out = re.sub(r"\W", "_", name)
    return out if out and not out[0].isdigit() else f"_{out}"


def _shape_literal(shape) -> str:
    shape = tuple(int(d) for d in shape)
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _site_code(plan: Plan, site, var: str, fn_code: str, variables: dict[str, str]) -> list[str]:
    """The statements that replace ``var = numpyro.sample(site.name, fn)``."""
    name = site.name
    batch = tuple(site.batch_shape)
    shape = _shape_literal(site.shape)
    expand = _shape_literal(batch + (1,) * (len(site.shape) - len(batch)))
    lines = []
    offset_terms = []
    for off in site.offsets:
        key = f"{name}|{off.parent}"
        xi = f"xi_{_ident(name)}_{_ident(off.parent)}"
        init = f"_AUTOREPARAM_XI[{key!r}]"
        param = f"numpyro.param({name + '_offset_' + off.parent!r}, jnp.zeros({_shape_literal(batch)}))"
        step = "" if plan.xi_step == 1.0 else f"{plan.xi_step!r} * "
        lines.append(f"{xi} = {init} + {step}{param}")
        parent = variables[off.parent]
        center = f" - _AUTOREPARAM_CENTER[{off.parent!r}]" if plan.center_of(off.parent) is not None else ""
        offset_terms.append(f"jnp.reshape({xi}, {expand}) * _autoreparam_absorb({parent}{center}, {key!r})")
    offset = f"{var}_offset"
    if offset_terms:
        lines.append(f"{offset} = " + " + ".join(offset_terms))
    if site.noncentred:
        centered = f"{_ident(name)}_centered"
        init = f"jnp.reshape(_AUTOREPARAM_CENTERED[{name!r}], {expand})"
        if site.learn_centered:
            lines.append(f"{centered} = numpyro.param({name + '_centered'!r}, {init}, "
                         "constraint=numpyro.distributions.constraints.unit_interval)")
        else:
            lines.append(f"{centered} = {init}")
        # The site's distribution is expanded to its full shape before LocScaleReparam sees it
        # (the reparam handler runs inside the plates, before they expand it).
        delta = f"-{offset}" if offset_terms else "0.0"
        target, sample_name = (f"{var}_base", f"{name}_base") if offset_terms else (var, name)
        lines.append(
            f"with numpyro.handlers.reparam(config={{{sample_name!r}: LocScaleReparam(centered={centered})}}):\n"
            f"    {target} = numpyro.sample({sample_name!r}, _autoreparam_shift_loc({fn_code}, {delta}, {shape}))")
        if offset_terms:
            lines.append(f"{var} = numpyro.deterministic({name!r}, {var}_base + {offset})")
    else:
        lines.append(f"{var}_base = numpyro.sample({name + '_base'!r}, AutoreparamShifted({fn_code}, -{offset}))")
        lines.append(f"{var} = numpyro.deterministic({name!r}, {var}_base + {offset})")
    return lines


_HELPERS = '''

# --- autoreparam: helpers and plan data for the reparameterized sites below -------------------
# Generated by `autoreparam analyze --emit source`; this file does not import autoreparam.
import jax
import jax.numpy as jnp
import numpyro
from numpyro.infer.reparam import LocScaleReparam


class AutoreparamShifted(numpyro.distributions.Distribution):
    """The law of x + delta for x ~ base (real support: unit Jacobian)."""

    arg_constraints = {}
    pytree_data_fields = ("base", "delta")

    def __init__(self, base, delta, *, validate_args=None):
        ndim = jnp.ndim(delta) - len(base.event_shape)
        batch_shape = jnp.broadcast_shapes(base.batch_shape, jnp.shape(delta)[:max(ndim, 0)])
        self.base, self.delta = base.expand(batch_shape), delta
        super().__init__(batch_shape, base.event_shape, validate_args=validate_args)

    @property
    def support(self):
        return self.base.support

    def sample(self, key, sample_shape=()):
        return self.base.sample(key, sample_shape) + self.delta

    def log_prob(self, value):
        return self.base.log_prob(value - self.delta)


def _autoreparam_shift_loc(fn, delta, shape):
    """The loc-scale family of fn with loc + delta, expanded to the site's shape (for LocScaleReparam)."""
    event_dim = fn.event_dim
    base = fn
    while isinstance(base, (numpyro.distributions.Independent, numpyro.distributions.ExpandedDistribution)):
        base = base.base_dist
    params = {k: getattr(base, k) for k in base.arg_constraints if hasattr(base, k)}
    params["loc"] = params["loc"] + delta
    shifted = type(base)(**params)
    shifted = shifted.expand(shape[: len(shape) - shifted.event_dim])
    return shifted.to_event(event_dim - shifted.event_dim) if shifted.event_dim < event_dim else shifted


def _autoreparam_absorb(value, key):
    """G(value): a parent's shared contribution in the child's coordinates (G = E @ M)."""
    (m_rows, m_cols, m_vals, m_n), (e_rows, e_cols, e_vals, e_n), shape = _AUTOREPARAM_MAPS[key]
    flat = jnp.reshape(value, (-1,))
    shared = jax.ops.segment_sum(jnp.asarray(m_vals) * flat[jnp.asarray(m_cols, dtype=jnp.int32)],
                                 jnp.asarray(m_rows, dtype=jnp.int32), num_segments=m_n)
    out = jax.ops.segment_sum(jnp.asarray(e_vals) * shared[jnp.asarray(e_cols, dtype=jnp.int32)],
                              jnp.asarray(e_rows, dtype=jnp.int32), num_segments=e_n)
    return jnp.reshape(out, shape)


'''


def _plan_data(plan: Plan) -> str:
    maps, xi, centered = {}, {}, {}
    for site in plan.sites:
        for off in site.offsets:
            key = f"{site.name}|{off.parent}"
            maps[key] = ((list(off.M.rows), list(off.M.cols), _nested(off.M.vals, None), off.M.shape[0]),
                         (list(off.E.rows), list(off.E.cols), _nested(off.E.vals, None), off.E.shape[0]),
                         tuple(site.shape))
            xi[key] = _nested(off.init, site.batch_shape)
        if site.noncentred:
            centered[site.name] = _nested(site.centered, site.batch_shape)
    shapes = {n: s for n, s, _ in plan.latent}
    centers = {n: _nested(v, shapes.get(n)) for n, v in plan.centers}
    fmt = lambda x: pprint.pformat(x, width=100, compact=True, sort_dicts=False)  # noqa: E731
    return (f"_AUTOREPARAM_MAPS = {fmt(maps)}\n"
            f"_AUTOREPARAM_XI = {{k: jnp.asarray(v) for k, v in {fmt(xi)}.items()}}\n"
            f"_AUTOREPARAM_CENTER = {{k: jnp.asarray(v) for k, v in {fmt(centers)}.items()}}\n"
            f"_AUTOREPARAM_CENTERED = {{k: jnp.asarray(v) for k, v in {fmt(centered)}.items()}}\n")


def _nested(values, shape):
    import numpy as np

    arr = np.asarray(values, dtype=float)
    if shape is not None:
        arr = arr.reshape(tuple(shape))
    arr = np.vectorize(lambda v: float(f"{v:.8g}"), otypes=[float])(arr) if arr.size else arr
    return arr.tolist() if arr.ndim else float(arr)


def emit_source(source: str, function: str, plan: Plan) -> EmitResult:
    """Rewrite ``function`` in ``source`` to carry ``plan``; returns the new source and warnings.

    >>> result = emit_source(open("model.py").read(), "model", plan)      # doctest: +SKIP
    >>> print(result.source)                                              # doctest: +SKIP
    """
    if not isinstance(plan, Plan):
        raise InputError(f"emit_source: plan must be an autoreparam.Plan, got {type(plan).__name__}")
    try:
        module = cst.parse_module(source)
    except cst.ParserSyntaxError as exc:
        raise InputError(f"emit_source: the source does not parse (line {exc.raw_line}): {exc.message}") from None
    if MARKER in source:
        return EmitResult(source, [f"'{function}' is already reparameterized by autoreparam; nothing to do"])
    if plan.is_empty():
        return EmitResult(source, [f"the plan for '{function}' is empty; the model is left as it is"])
    rewriter = _SiteRewriter(function, plan, module)
    new_module = MetadataWrapper(module).visit(rewriter)
    if not rewriter.found_function:
        raise InputError(f"emit_source: no top-level function named '{function}' in the source")
    warnings = list(rewriter.warnings)
    elsewhere = _literal_sites(MetadataWrapper(module))
    for name in plan.names:
        if name not in rewriter.rewritten and name not in rewriter.seen_sites:
            if name in elsewhere:
                where_fn, line = elsewhere[name]
                warnings.append(f"line {line}: site '{name}' is sampled in '{where_fn}', not in "
                                f"'{function}'; left unchanged (move the sample statement into '{function}')")
            else:
                lines = ", ".join(str(n) for n in rewriter.nonliteral_lines)
                hint = f" (it may be one of the non-literal names at line {lines})" if lines else ""
                warnings.append(f"site '{name}' is not sampled by a literal numpyro.sample statement in "
                                f"'{function}'{hint}; left unchanged")
    if not rewriter.rewritten:
        return EmitResult(source, warnings)
    plan_for_data = Plan(plan.model, tuple(s for s in plan.sites if s.name in rewriter.rewritten),
                         (), plan.latent, plan.init, plan.centers, plan.xi_step)
    header = [cst.EmptyLine(comment=cst.Comment(c)) for c in (
        f"{MARKER} ({', '.join(rewriter.rewritten)}).",
        f"# Generated by `autoreparam analyze --emit source` from the plan of '{function}' (xi init: {plan.init}).",
        "# Each rewritten site is x = x_base + offset, an exact change of variables (see each site).",
    )]
    at = _after_imports(new_module)
    body = list(new_module.body)
    helpers = cst.parse_module(_HELPERS + _plan_data(plan_for_data))
    existing = {new_module.code_for_node(s).strip() for s in body[:at]
                if m.matches(s, m.SimpleStatementLine(body=[m.OneOf(m.Import(), m.ImportFrom())]))}
    helper_body = [s for s in helpers.body if helpers.code_for_node(s).strip() not in existing]
    helper_body[0] = helper_body[0].with_changes(
        leading_lines=(*helpers.header, *helper_body[0].leading_lines))
    # A shebang or coding line must stay first.
    keep = 0
    for line in new_module.header:
        text = line.comment.value if line.comment else ""
        if keep < 2 and (text.startswith("#!") or re.match(r"#.*coding[:=]", text)):
            keep += 1
        else:
            break
    new_module = new_module.with_changes(
        header=[*new_module.header[:keep], *header, *new_module.header[keep:]],
        body=[*body[:at], *helper_body, *body[at:]])
    new_source = new_module.code
    try:
        cst.parse_module(new_source)
    except cst.ParserSyntaxError as exc:  # never emit code that does not parse
        raise InputError(f"emit_source: internal error, the rewritten source does not parse: {exc.message}") \
            from None
    return EmitResult(new_source, warnings, tuple(rewriter.rewritten))


class _LiteralSites(cst.CSTVisitor):
    METADATA_DEPENDENCIES = (PositionProvider,)

    def __init__(self):
        super().__init__()
        self.functions: list[str] = []
        self.found: dict[str, tuple[str, int]] = {}

    def visit_FunctionDef(self, node):
        self.functions.append(node.name.value)

    def leave_FunctionDef(self, node):
        self.functions.pop()

    def visit_Call(self, node):
        if _is_sample_call(node) and (name := _site_name(node)) is not None and name not in self.found:
            where = self.functions[-1] if self.functions else "<module>"
            self.found[name] = (where, self.get_metadata(PositionProvider, node).start.line)


def _literal_sites(wrapper: MetadataWrapper) -> dict[str, tuple[str, int]]:
    """Site name -> (function, line) of every literal numpyro.sample call in a module."""
    visitor = _LiteralSites()
    wrapper.visit(visitor)
    return visitor.found


def _after_imports(module: cst.Module) -> int:
    """Index of the first module statement after the docstring and the leading imports."""
    for i, stmt in enumerate(module.body):
        is_doc = m.matches(stmt, m.SimpleStatementLine(body=[m.Expr(m.SimpleString())]))
        is_import = m.matches(stmt, m.SimpleStatementLine(body=[m.OneOf(m.Import(), m.ImportFrom())]))
        if not (is_doc or is_import):
            return i
    return len(module.body)


def emit_config(plan: Plan, model_module: str | None = None, function: str = "model") -> str:
    """A small Python module that builds the plan's reparam config (it imports autoreparam)."""
    import json

    data = json.dumps(plan.to_json())
    lines = [
        '"""Reparam config for ' + function + ', generated by `autoreparam analyze --emit config`.',
        "",
        "    config = make_config()",
        "    reparam_model = numpyro.handlers.reparam(config.record(model), config=config)",
        '"""',
        "",
        "import json",
        "",
        "from autoreparam import Plan",
        "",
        f"PLAN = Plan.from_json(json.loads({data!r}))",
        "",
        "",
        "def make_config(learn=True):",
        '    """The NumPyro reparam config (site -> Reparam); apply it with config.record(model)."""',
        "    return PLAN.to_config(learn=learn)",
        "",
        "",
        "def reparameterize(model, learn=True):",
        '    """``model`` with the plan applied, ready for SVI or MCMC."""',
        "    import numpyro",
        "",
        "    config = make_config(learn)",
        "    return numpyro.handlers.reparam(config.record(model), config=config)",
        "",
    ]
    return "\n".join(lines)
