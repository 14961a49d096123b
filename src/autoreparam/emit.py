"""Rewrite a model's source so it carries a plan's reparameterization (a libcst codemod).

Every ``x = numpyro.sample("x", fn)`` statement of a planned site becomes explicit NumPyro
code: the offset parameters, the offset, the sample of ``x_base`` with the shifted density and
``x = numpyro.deterministic("x", x_base + x_offset)`` (or, for a non-centred site, the sample of
``x_decentered`` with an exact log-Jacobian factor). Everything else keeps its formatting byte
for byte. The output imports only jax, numpy and numpyro: an ``@autoreparam.auto`` decorator
on the function is removed (and ``import autoreparam`` when nothing else uses it). NumPyro is
recognised by the names the source binds (``import numpyro as npr``, ``from numpyro import
sample``), and every name the emitter adds (variables, helpers, imports, sites and params) is
fresh: it never shadows a name of the source nor a site of the model. Statements that cannot be
rewritten safely are left as they are, with a warning naming the site and line.
"""

from __future__ import annotations

import builtins
import json
import pprint
import re
import string
from dataclasses import dataclass, field

import libcst as cst
import numpy as np
import libcst.matchers as m
from libcst.metadata import (FunctionScope, GlobalScope, MetadataWrapper, PositionProvider, QualifiedNameProvider,
                             QualifiedNameSource, ScopeProvider)

from .distributions import AutoreparamShifted, emitted_source
from .errors import InputError
from .names import fresh_name
from .plan import Plan

__all__ = ["EmitResult", "emit_source", "emit_config", "MARKER"]

MARKER = "# autoreparam: reparameterized model"

SAMPLE = frozenset({"numpyro.sample", "numpyro.primitives.sample"})
DETERMINISTIC = frozenset({"numpyro.deterministic", "numpyro.primitives.deterministic"})
AUTO = frozenset({"autoreparam.auto", "autoreparam.api.auto"})
REPARAMETERIZE = frozenset({"autoreparam.reparameterize", "autoreparam.api.reparameterize"})


@dataclass(frozen=True)
class EmitResult:
    """The rewritten source and the warnings about statements left unchanged."""

    source: str
    warnings: list[str] = field(default_factory=list)
    rewritten: tuple[str, ...] = ()


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


def _dotted(node) -> str | None:
    """``a.b.c`` for a Name/Attribute chain, else None."""
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr.value}"
    return None


class _SourceFacts(cst.CSTVisitor):
    """What the source binds and calls: resolved NumPyro calls, site names, decorators, names in use."""

    METADATA_DEPENDENCIES = (QualifiedNameProvider, ScopeProvider, PositionProvider)

    def __init__(self, function: str):
        super().__init__()
        self.function = function
        self.sample_calls: set = set()
        self.deterministic_calls: set = set()
        self.site_names: set[str] = set()  # literal names of numpyro.* calls (sites, params, plates)
        self.auto_decorators: set = set()  # decorators of the target function that are autoreparam.auto
        self.target = None  # the (last) top-level FunctionDef named `function`
        self.runtime_reparam: list[tuple[int, str]] = []  # autoreparam calls on the function elsewhere
        self.depth = 0
        self.classes = 0
        self.star_modules: list[str] = []  # modules of top-level `from X import *`

    def visit_ImportFrom(self, node):
        if isinstance(node.names, cst.ImportStar) and not node.relative and node.module is not None \
                and self.depth == 0:
            self.star_modules.append(_dotted(node.module))

    def qualified(self, node) -> set[str]:
        names = {q.name for q in self.get_metadata(QualifiedNameProvider, node, set())}
        if not names:  # an unbound name: its spelling, or what a star import may have bound it to
            dotted = _dotted(node)
            if dotted is not None:
                names = {dotted} | {f"{module}.{dotted}" for module in self.star_modules}
        return names

    def visit_ClassDef(self, node):
        self.classes += 1

    def leave_ClassDef(self, node):
        self.classes -= 1

    def visit_FunctionDef(self, node):
        if self.depth == 0 and not self.classes and node.name.value == self.function:
            self.target = node  # the last definition is the one the module ends up with
            self.auto_decorators = set()
            for dec in node.decorators:
                target = dec.decorator.func if isinstance(dec.decorator, cst.Call) else dec.decorator
                if self.qualified(target) & AUTO:
                    self.auto_decorators.add(dec)
        self.depth += 1

    def leave_FunctionDef(self, node):
        self.depth -= 1

    def visit_Call(self, node):
        names = self.qualified(node.func)
        if names & SAMPLE:
            self.sample_calls.add(node)
        if names & DETERMINISTIC:
            self.deterministic_calls.add(node)
        if any(n.startswith("numpyro.") for n in names) and (site := _site_name(node)) is not None:
            self.site_names.add(site)
        if names & (AUTO | REPARAMETERIZE) and node.args and m.matches(node.args[0].value, m.Name(self.function)):
            line = self.get_metadata(PositionProvider, node).start.line
            self.runtime_reparam.append((line, sorted(names & (AUTO | REPARAMETERIZE))[0]))


def _names_in_use(scopes) -> set[str]:
    """Every name bound or read in any scope of the module (and every builtin)."""
    used = set(dir(builtins))
    for scope in {s for s in scopes.values() if s is not None}:
        used |= {a.name for a in scope.assignments}
        for access in scope.accesses:
            dotted = _dotted(access.node)
            if dotted is not None:
                used.add(dotted.split(".")[0])
    return used


def _top_level_imports(body) -> set[tuple[str, str]]:
    """(bound name, module or object) of the plain import statements in ``body``."""
    bound = set()
    for stmt in body:
        if not m.matches(stmt, m.SimpleStatementLine(body=[m.OneOf(m.Import(), m.ImportFrom())])):
            continue
        imp = stmt.body[0]
        if isinstance(imp, cst.Import):
            for alias in imp.names:
                full = _dotted(alias.name)
                if alias.asname is not None:
                    bound.add((alias.asname.name.value, full))
                else:
                    bound.add((full.split(".")[0], full.split(".")[0]))
        elif not imp.relative and imp.module is not None and not isinstance(imp.names, cst.ImportStar):
            module = _dotted(imp.module)
            for alias in imp.names:
                name = alias.name.value
                bound.add((alias.asname.name.value if alias.asname else name, f"{module}.{name}"))
    return bound


# Module-level names of the emitted code: key -> (preferred name, what it is, import statement or None).
# An import is reused when the source already binds the name to the same thing before the helper block.
_MODULES = {
    "jax": ("jax", "jax", "import jax", "import jax as {}"),
    "jnp": ("jnp", "jax.numpy", "import jax.numpy as jnp", "import jax.numpy as {}"),
    "numpyro": ("numpyro", "numpyro", "import numpyro", "import numpyro as {}"),
}
_HELPER_NAMES = {
    "Shifted": "AutoreparamShifted", "shift_loc": "_autoreparam_shift_loc", "absorb": "_autoreparam_absorb",
    "Decentred": "AutoreparamDecentred", "LogDet": "AutoreparamLogDet", "SiteScale": "_AutoreparamSiteScale",
    "noncentre": "_autoreparam_noncentre", "draw_decentred": "_autoreparam_draw_decentred",
    "DecentredMVN": "AutoreparamDecentredMVN",
    "MAPS": "_AUTOREPARAM_MAPS", "XI": "_AUTOREPARAM_XI", "CENTER": "_AUTOREPARAM_CENTER",
    "CENTERED": "_AUTOREPARAM_CENTERED",
}


class _Names:
    """The names the emitter adds, each fresh: Python names against every name the source uses,
    site and param names against every site name of the model."""

    def __init__(self, used: set[str], sites: set[str]):
        self.used = set(used)
        self.sites = set(sites)
        self.g: dict[str, str] = {}  # key of _MODULES / _HELPER_NAMES -> the name in the emitted code
        self.imports: dict[str, tuple[str, bool]] = {}  # module key -> (import statement, already there)

    def choose_modules(self, global_scope, function_locals: set[str], existing: set[tuple[str, str]]):
        for key, (name, target, plain, aliased) in _MODULES.items():
            bound = global_scope.get_qualified_names_for(name) if global_scope is not None else set()
            same = bool(bound) and all(q.name == target and q.source == QualifiedNameSource.IMPORT for q in bound)
            if name not in function_locals and (same or name not in self.used):
                self.imports[key] = (plain, (name, target) in existing)
            else:
                name = fresh_name(name, self.used)
                self.imports[key] = (aliased.format(name), False)
            self.used.add(name)
            self.g[key] = name
        for key, name in _HELPER_NAMES.items():
            self.g[key] = self.local(name)

    def local(self, base: str) -> str:
        name = fresh_name(base, self.used)
        self.used.add(name)
        return name

    def site(self, base: str) -> str:
        name = fresh_name(base, self.sites)
        self.sites.add(name)
        return name


class _SiteRewriter(cst.CSTTransformer):
    """Rewrites the planned sample statements of one function."""

    METADATA_DEPENDENCIES = (PositionProvider,)

    def __init__(self, function: str, plan: Plan, module: cst.Module, facts: _SourceFacts, names: _Names):
        super().__init__()
        self.function = function
        self.plan = plan
        self.module = module
        self.facts = facts
        self.names = names
        # A site with neither offsets nor non-centring (a hand-built plan) has nothing to rewrite.
        self.planned = {s.name for s in plan.sites if s.offsets or s.noncentred}
        self.depth = 0  # > 0 inside the target function
        self.loops = 0
        self.found_function = False
        self.rewritten: list[str] = []
        self.noncentred: list[str] = []
        self.warnings: list[str] = []
        self.seen_sites: set[str] = set()
        self.classes = 0
        self.variables: dict[str, str] = {}  # site name -> the variable its value is bound to
        self.nonliteral_lines: list[int] = []
        self._simple_sites: set[str] = set()

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
        if node is self.facts.target:
            self.found_function = True
            self.depth = 1
            return True
        if self.depth:
            self.depth += 1
        return True

    def leave_FunctionDef(self, original, updated):
        if self.depth:
            self.depth -= 1
        if original is self.facts.target and self.facts.auto_decorators:
            updated = _without_decorators(original, updated, self.facts.auto_decorators)
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
        if self.depth != 1 or node not in self.facts.sample_calls:
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
            bound = self._bound_site(node) if not self.loops else None
            if bound is not None:
                self.variables[bound[1]] = bound[0]
        return True

    @staticmethod
    def _single_assignment(node: cst.SimpleStatementLine):
        """(variable, value) for a statement ``variable = value``, else None."""
        if len(node.body) != 1 or not isinstance(node.body[0], cst.Assign):
            return None
        assign = node.body[0]
        if len(assign.targets) != 1 or not isinstance(assign.targets[0].target, cst.Name):
            return None
        return assign.targets[0].target.value, assign.value

    def _simple_assignment(self, node: cst.SimpleStatementLine):
        found = self._single_assignment(node)
        if found is None or not isinstance(found[1], cst.Call) or found[1] not in self.facts.sample_calls:
            return None
        variable, call = found
        name = _site_name(call)
        if name is None or _has_obs(call) or _dist_arg(call) is None:
            return None
        return variable, name, call

    def _bound_site(self, node: cst.SimpleStatementLine):
        """(variable, site) for ``var = numpyro.sample("site", ...)`` or ``numpyro.deterministic``."""
        found = self._single_assignment(node)
        if found is None:
            return None
        variable, call = found
        if call in self.facts.sample_calls or call in self.facts.deterministic_calls:
            name = _site_name(call)
            if name is not None:
                return variable, name
        return None

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
        batch, shape = tuple(site.batch_shape), tuple(site.shape)
        if not site.cholesky and batch and not site.sample_ndim and shape[:len(batch)] != batch and any(
                a.keyword is not None and a.keyword.value == "sample_shape" for a in call.args):
            # A plan without sample_ndim (written by hand, or before it existed) whose batch is not the
            # leading part of the shape: sample dims come first, and the reshapes would not broadcast.
            # (Inside a plate, NumPyro folds the sample dims into the batch.)
            self.warnings.append(f"line {self._line(original)}: site '{site_name}' is drawn with sample_shape= "
                                 f"from a distribution with batch shape {tuple(site.batch_shape)}, and the plan "
                                 "does not give its sample_ndim (re-run the analysis); left unchanged")
            return updated
        fn_code = self.module.code_for_node(_dist_arg(call))
        lines = _site_code(self.plan, site, var, fn_code, self.variables, self.names)
        statements = [cst.parse_statement(line) for line in lines]
        comment = cst.EmptyLine(comment=cst.Comment(
            f"# autoreparam: '{site_name}' reparameterized (exact change of variables)"))
        statements[0] = statements[0].with_changes(leading_lines=(*original.leading_lines, comment))
        statements[-1] = _with_trailing(statements[-1], original.trailing_whitespace)
        self.rewritten.append(site_name)
        if site.noncentred:
            self.noncentred.append(site_name)
        return cst.FlattenSentinel(statements)


def _without_decorators(original: cst.FunctionDef, updated: cst.FunctionDef, drop: set) -> cst.FunctionDef:
    """``updated`` without the decorators whose original node is in ``drop`` (their comments are kept)."""
    kept, carried = [], []
    for before, after in zip(original.decorators, updated.decorators):
        if before in drop:
            carried.extend(after.leading_lines)
            continue
        kept.append(after.with_changes(leading_lines=(*carried, *after.leading_lines)) if carried else after)
        carried = []
    if carried:
        updated = updated.with_changes(lines_after_decorators=(*carried, *updated.lines_after_decorators))
    return updated.with_changes(decorators=kept)


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


def _site_code(plan: Plan, site, var: str, fn_code: str, variables: dict[str, str], names: _Names) -> list[str]:
    """The statements that replace ``var = numpyro.sample(site.name, fn)``."""
    g = names.g
    name = site.name
    batch = tuple(site.batch_shape)
    shape = _shape_literal(site.shape)
    expand = _shape_literal(batch + (1,) * (len(site.shape) - site.sample_ndim - len(batch)))
    lines = []
    offset_terms = []
    for off in site.offsets:
        key = f"{name}|{off.parent}"
        xi = names.local(f"xi_{_ident(name)}_{_ident(off.parent)}")
        init = f"{g['XI']}[{key!r}]"
        param_name = names.site(f"{name}_offset_{off.parent}")
        param = f"{g['numpyro']}.param({param_name!r}, {g['jnp']}.zeros({_shape_literal(batch)}))"
        step = "" if plan.xi_step == 1.0 else f"{plan.xi_step!r} * "
        lines.append(f"{xi} = {init} + {step}{param}")
        parent = variables[off.parent]
        center = f" - {g['CENTER']}[{off.parent!r}]" if plan.anchor_of(off.parent) is not None else ""
        offset_terms.append(f"{g['jnp']}.reshape({xi}, {expand}) * {g['absorb']}({parent}{center}, {key!r})")
    offset = names.local(f"{var}_offset") if offset_terms else None
    if offset_terms:
        lines.append(f"{offset} = " + " + ".join(offset_terms))
    if site.cholesky:
        # x = loc + scale_tril @ d with d the site {name}_decentered (no offsets: SitePlan.check).
        drawn = (f"{g['draw_decentred']}({g['DecentredMVN']}({fn_code}, {shape}), "
                 f"{names.site(name + '_decentered')!r}, {names.site(name + '_log_det')!r})")
        lines.append(f"{var} = {g['numpyro']}.deterministic({name!r}, {drawn})")
    elif site.noncentred:
        centered = names.local(f"{_ident(name)}_centered")
        init = f"{g['jnp']}.reshape({g['CENTERED']}[{name!r}], {expand})"
        if site.learn_centredness:
            # The param has the batch shape, as reparameterize's, so that params carry over between
            # them; event dims (.to_event) are unit dims added after it.
            param = (f"{g['numpyro']}.param({names.site(name + '_centered')!r}, "
                     f"{g['jnp']}.reshape({g['CENTERED']}[{name!r}], {_shape_literal(batch)}), "
                     f"constraint={g['numpyro']}.distributions.constraints.unit_interval)")
            if _shape_literal(batch) != expand:
                param = f"{g['jnp']}.reshape({param}, {expand})"
            lines.append(f"{centered} = {param}")
        else:
            lines.append(f"{centered} = {init}")
        # x = loc + scale ** (1 - c) * (d - c * loc) with d the site {name}_decentered; the log-Jacobian is
        # its own factor site, which no scale, mask or subsampled plate applies to (exact, see the helper).
        delta = f"-{offset}" if offset_terms else "0.0"
        drawn = (f"{g['noncentre']}({g['shift_loc']}({fn_code}, {delta}, {shape}), {centered}, "
                 f"{names.site(name + '_decentered')!r}, {names.site(name + '_log_det')!r})")
        if offset_terms:
            base = names.local(f"{var}_base")
            lines.append(f"{base} = {drawn}")
            lines.append(f"{var} = {g['numpyro']}.deterministic({name!r}, {base} + {offset})")
        else:
            lines.append(f"{var} = {g['numpyro']}.deterministic({name!r}, {drawn})")
    else:
        base = names.local(f"{var}_base")
        lines.append(f"{base} = {g['numpyro']}.sample({names.site(name + '_base')!r}, "
                     f"{g['Shifted']}({fn_code}, -{offset}))")
        lines.append(f"{var} = {g['numpyro']}.deterministic({name!r}, {base} + {offset})")
    return lines


_HELPERS_HEAD = '''

# --- autoreparam: helpers and plan data for the reparameterized sites below -------------------
# Generated by `autoreparam analyze --emit source`; this file does not import autoreparam.
'''

# The shifted law is the runtime's own class (distributions.AutoreparamShifted), as source.
_HELPERS = string.Template("\n\n" + emitted_source(AutoreparamShifted, "Shifted") + '''

def $shift_loc(fn, delta, shape):
    """The loc-scale family of fn with loc + delta, expanded to the site's shape, under fn's own
    .to_event and .mask wrappers (for non-centring)."""
    if isinstance(fn, $numpyro.distributions.MaskedDistribution):
        return $shift_loc(fn.base_dist, delta, shape).mask(fn._mask)
    if isinstance(fn, $numpyro.distributions.Independent):
        return $shift_loc(fn.base_dist, delta, shape).to_event(fn.reinterpreted_batch_ndims)
    if isinstance(fn, $numpyro.distributions.ExpandedDistribution):
        return $shift_loc(fn.base_dist, delta, shape)  # expanded to the whole shape below
    params = {k: getattr(fn, k) for k in fn.arg_constraints if hasattr(fn, k)}
    params["loc"] = params["loc"] + delta
    shifted = type(fn)(**params)
    return shifted.expand(shape[: len(shape) - shifted.event_dim])


def $absorb(value, key):
    """G(value): a parent's shared contribution in the child's coordinates (G = E @ M)."""
    (m_rows, m_cols, m_vals, m_n), (e_rows, e_cols, e_vals, e_n), shape = $MAPS[key]
    flat = $jnp.reshape(value, (-1,))
    shared = $jax.ops.segment_sum($jnp.asarray(m_vals) * flat[$jnp.asarray(m_cols, dtype=$jnp.int32)],
                                 $jnp.asarray(m_rows, dtype=$jnp.int32), num_segments=m_n)
    out = $jax.ops.segment_sum($jnp.asarray(e_vals) * shared[$jnp.asarray(e_cols, dtype=$jnp.int32)],
                              $jnp.asarray(e_rows, dtype=$jnp.int32), num_segments=e_n)
    return $jnp.reshape(out, shape)
''')

_NONCENTRE_HELPERS = string.Template('''

class $Decentred($numpyro.distributions.Distribution):
    """The decentred coordinate d of x ~ fn (a loc-scale family expanded to the site's shape):
    x = loc + scale ** (1 - c) * (d - c * loc), where d ~ the family with loc * c and scale ** c.

    log_prob(d) is fn's log density at x(d), without the Jacobian, so that every scale, mask and
    subsampled plate weighs it exactly as it weighs the original site. The log-Jacobian is the
    separate factor of $noncentre.
    """

    arg_constraints = {}
    pytree_data_fields = ("fn", "centered")

    def __init__(self, fn, centered, *, validate_args=None):
        self.fn, self.centered = fn, centered
        super().__init__(fn.batch_shape, fn.event_shape, validate_args=validate_args)

    @property
    def support(self):
        return self.fn.support

    def _family(self):
        base = self.fn
        while isinstance(base, ($numpyro.distributions.Independent, $numpyro.distributions.ExpandedDistribution,
                                $numpyro.distributions.MaskedDistribution)):
            base = base.base_dist
        params = {k: getattr(base, k) for k in base.arg_constraints if hasattr(base, k)}
        shape = self.fn.shape()
        loc, scale = $jnp.broadcast_to(params["loc"], shape), $jnp.broadcast_to(params["scale"], shape)
        return type(base), params, loc, scale, $jnp.broadcast_to(self.centered, shape)

    def sample(self, key, sample_shape=()):
        family, params, loc, scale, c = self._family()
        return family(**{**params, "loc": c * loc, "scale": scale ** c}).sample(key, sample_shape)

    def recentre(self, value):
        _, _, loc, scale, c = self._family()
        return loc + scale ** (1.0 - c) * (value - c * loc)

    def log_prob(self, value):
        return self.fn.log_prob(self.recentre(value))

    def log_abs_det_jacobian(self):
        """log |dx/dd| per batch element."""
        _, _, _, scale, c = self._family()
        log_det = (1.0 - c) * $jnp.log(scale)
        return $jnp.sum(log_det, axis=tuple(range(-len(self.event_shape), 0))) if self.event_shape else log_det


class $LogDet($numpyro.distributions.distribution.Unit):
    """A log-Jacobian factor. It belongs to the coordinates, not to a term of the model, so no mask
    applies to it ($noncentre sets its weight)."""

    def mask(self, mask):
        return self

    def expand(self, batch_shape):
        return type(self)($jnp.broadcast_to(self.log_factor, batch_shape))


class $SiteScale($numpyro.primitives.Messenger):
    """Reads the weight the log-Jacobian of one site needs: the subsample factor of its subsampled
    plates (size / subsample_size: the site stands for the whole plate) over the scale that the
    enclosing handlers give it (scale and subsampled plates, which also weigh the factor)."""

    def __init__(self, site):
        super().__init__()
        self.site, self.weight = site, 1.0

    def postprocess_message(self, msg):
        if msg.get("name") != self.site:
            return
        plates = {m.name: m for m in $numpyro.primitives._PYRO_STACK if isinstance(m, $numpyro.plate)}
        for frame in msg["cond_indep_stack"]:
            plate = plates.get(frame.name)
            if plate is not None and plate.subsample_size != plate.size:
                self.weight = self.weight * plate.size / plate.subsample_size
        if msg.get("scale") is not None:
            self.weight = self.weight / msg["scale"]


def $noncentre(fn, centered, decentered_site, log_det_site):
    """x ~ fn drawn as the site decentered_site (see $Decentred and $draw_decentred)."""
    return $draw_decentred($Decentred(fn, centered), decentered_site, log_det_site)


def $draw_decentred(decentred, decentered_site, log_det_site):
    """x drawn as the site decentered_site with law decentred. The factor log_det_site adds
    log |dx/dd| once whatever scale or mask applies here, so the log joint in d is exactly the
    original log joint at x(d) plus the log-Jacobian; under a subsampled plate it is weighed by
    size / subsample_size like the density, an unbiased estimate of the full model's log joint."""
    site_scale = $SiteScale(decentered_site)
    with site_scale:
        value = $numpyro.sample(decentered_site, decentred)
    log_det = decentred.log_abs_det_jacobian() * site_scale.weight
    $numpyro.sample(log_det_site, $LogDet(log_det), obs=$jnp.empty($jnp.shape(log_det) + (0,)),
                   infer={"is_auxiliary": True})
    return decentred.recentre(value)
''')


_MVN_HELPERS = string.Template('''

class $DecentredMVN($numpyro.distributions.Distribution):
    """The standardised coordinate d of x ~ fn (a MultivariateNormal, expanded to the site's shape):
    x = loc + scale_tril @ d, where d ~ Normal(0, 1) per coordinate under the prior.

    log_prob(d) is fn's log density at x(d), without the Jacobian (see $Decentred).
    """

    arg_constraints = {}
    pytree_data_fields = ("fn",)

    def __init__(self, fn, shape, *, validate_args=None):
        batch = tuple(shape[: len(shape) - fn.event_dim])
        self.fn = fn if tuple(fn.batch_shape) == batch else fn.expand(batch)
        super().__init__(self.fn.batch_shape, self.fn.event_shape, validate_args=validate_args)

    @property
    def support(self):
        return self.fn.support

    def _factor(self):
        base = self.fn
        while isinstance(base, ($numpyro.distributions.Independent, $numpyro.distributions.ExpandedDistribution,
                                $numpyro.distributions.MaskedDistribution)):
            base = base.base_dist
        shape = self.fn.shape()
        return $jnp.broadcast_to(base.loc, shape), $jnp.broadcast_to(base.scale_tril, shape + shape[-1:])

    def sample(self, key, sample_shape=()):
        loc, _ = self._factor()
        return $jax.random.normal(key, tuple(sample_shape) + loc.shape, loc.dtype)

    def recentre(self, value):
        loc, scale_tril = self._factor()
        return loc + $jnp.squeeze(scale_tril @ value[..., None], -1)

    def log_prob(self, value):
        return self.fn.log_prob(self.recentre(value))

    def log_abs_det_jacobian(self):
        """log |dx/dd| per batch element."""
        _, scale_tril = self._factor()
        log_det = $jnp.sum($jnp.log($jnp.abs($jnp.diagonal(scale_tril, axis1=-2, axis2=-1))), -1)
        extra = len(self.event_shape) - 1  # event dims of .to_event on the MultivariateNormal
        return $jnp.sum(log_det, axis=tuple(range(-extra, 0))) if extra else log_det
''')


def _helpers_source(names: _Names, noncentred: bool, cholesky: bool = False) -> tuple[str, list[bool]]:
    """The helper block (imports first) and, per import statement in it, whether the source has it already."""
    imports = [names.imports[key] for key in _MODULES]
    text = _HELPERS_HEAD + "".join(f"{statement}\n" for statement, _ in imports)
    text += _HELPERS.substitute(names.g)
    if noncentred:
        text += _NONCENTRE_HELPERS.substitute(names.g)
    if cholesky:
        text += _MVN_HELPERS.substitute(names.g)
    return text + "\n\n", [there for _, there in imports]


def _plan_data(plan: Plan, g: dict[str, str]) -> str:
    maps, xi, centered = {}, {}, {}
    for site in plan.sites:
        for off in site.offsets:
            key = f"{site.name}|{off.parent}"
            maps[key] = ((list(off.M.rows), list(off.M.cols), _nested(off.M.vals, None), off.M.shape[0]),
                         (list(off.E.rows), list(off.E.cols), _nested(off.E.vals, None), off.E.shape[0]),
                         tuple(site.shape))
            xi[key] = _nested(off.init, site.batch_shape)
        if site.noncentred and not site.cholesky:
            centered[site.name] = _nested(site.centredness, site.batch_shape)
    shapes = {n: s for n, s, _ in plan.latent}
    centers = {n: _nested(v, shapes.get(n)) for n, v in plan.anchors}
    fmt = lambda x: pprint.pformat(x, width=100, compact=True, sort_dicts=False)  # noqa: E731
    jnp = g["jnp"]
    return (f"{g['MAPS']} = {fmt(maps)}\n"
            f"{g['XI']} = {{k: {jnp}.asarray(v) for k, v in {fmt(xi)}.items()}}\n"
            f"{g['CENTER']} = {{k: {jnp}.asarray(v) for k, v in {fmt(centers)}.items()}}\n"
            f"{g['CENTERED']} = {{k: {jnp}.asarray(v) for k, v in {fmt(centered)}.items()}}\n")


def _nested(values, shape):
    arr = np.asarray(values, dtype=float)
    if shape is not None:
        arr = arr.reshape(tuple(shape))
    arr = np.vectorize(lambda v: float(f"{v:.8g}"), otypes=[float])(arr) if arr.size else arr
    return arr.tolist() if arr.ndim else float(arr)


def emit_source(source: str, function: str, plan: Plan) -> EmitResult:
    r"""Rewrite ``function`` in ``source`` to carry ``plan``; returns the new source and warnings.

    >>> source = "\n".join(["import numpyro", "import numpyro.distributions as dist", "", "",
    ...                     "def model():", '    mu = numpyro.sample("mu", dist.Normal(0, 1))',
    ...                     '    a = numpyro.sample("a", dist.Normal(mu, 1))', ""])
    >>> offset = Offset("mu", SparseMap((1, 1), (0,), (0,), (1.0,)), SparseMap((1, 1), (0,), (0,), (1.0,)), (-0.5,))
    >>> result = emit_source(source, "model", Plan("model", (SitePlan("a", (), (), (offset,)),)))
    >>> print("\n".join(result.source.splitlines()[-4:]))
        xi_a_mu = _AUTOREPARAM_XI['a|mu'] + numpyro.param('a_offset_mu', jnp.zeros(()))
        a_offset = jnp.reshape(xi_a_mu, ()) * _autoreparam_absorb(mu, 'a|mu')
        a_base = numpyro.sample('a_base', AutoreparamShifted(dist.Normal(mu, 1), -a_offset))
        a = numpyro.deterministic('a', a_base + a_offset)
    """
    if not isinstance(source, str):
        hint = "; decode it first, e.g. source.decode('utf-8')" if isinstance(source, (bytes, bytearray)) else ""
        raise InputError(f"emit_source: source must be the text of a Python file (str), got "
                         f"{type(source).__name__}{hint}")
    if not isinstance(function, str) or not function.isidentifier():
        raise InputError(f"emit_source: function must be the name of a function in the source, got {function!r}")
    if not isinstance(plan, Plan):
        raise InputError(f"emit_source: plan must be an autoreparam.Plan, got {type(plan).__name__}")
    plan.check()  # a hand-built plan with NaN or out-of-range maps must not reach the emitted file
    try:
        module = cst.parse_module(source)
    except cst.ParserSyntaxError as exc:
        raise InputError(f"emit_source: the source does not parse (line {exc.raw_line}): {exc.message}") from None
    if MARKER in source:
        return EmitResult(source, [f"'{function}' is already reparameterized by autoreparam; nothing to do"])
    if plan.is_empty():
        return EmitResult(source, [f"the plan for '{function}' is empty; the model is left as it is"])
    wrapper = MetadataWrapper(module)
    module = wrapper.module
    facts = _SourceFacts(function)
    wrapper.visit(facts)
    if facts.target is None:
        raise InputError(f"emit_source: no top-level function named '{function}' in the source")
    scopes = wrapper.resolve(ScopeProvider)
    global_scope = scopes[module]
    function_scope = scopes.get(facts.target.body)
    function_locals = {a.name for a in function_scope.assignments} if isinstance(function_scope, FunctionScope) \
        else set()
    at = _after_imports(module)
    names = _Names(_names_in_use(scopes),
                   facts.site_names | {n for n, _, _ in plan.latent} | set(plan.names))
    names.choose_modules(global_scope if isinstance(global_scope, GlobalScope) else None, function_locals,
                         _top_level_imports(module.body[:at]))
    rewriter = _SiteRewriter(function, plan, module, facts, names)
    new_module = wrapper.visit(rewriter)
    warnings = list(rewriter.warnings)
    elsewhere = _literal_sites(facts, wrapper)
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
    for line, call in facts.runtime_reparam:
        warnings.append(f"line {line}: '{function}' is passed to {call} there, which reparameterizes it again "
                        "at run time; use the emitted function as it is")
    new_module = _drop_unused_autoreparam_imports(new_module, module, global_scope, facts)
    plan_for_data = Plan(plan.model, tuple(s for s in plan.sites if s.name in rewriter.rewritten),
                         (), plan.latent, plan.init, plan.anchors, plan.xi_step)
    header = [cst.EmptyLine(comment=cst.Comment(c)) for c in (
        f"{MARKER} ({', '.join(rewriter.rewritten)}).",
        f"# Generated by `autoreparam analyze --emit source` from the plan of '{function}' (xi init: {plan.init}).",
        "# Each rewritten site is an exact change of variables: x = x_base + offset, or non-centred (see each site).",
    )]
    at = _after_imports(new_module)
    body = list(new_module.body)
    cholesky = any(plan[n].cholesky for n in rewriter.rewritten)
    helper_text, already = _helpers_source(names, bool(rewriter.noncentred), cholesky)
    # In the file's own newlines: libcst writes statements with them but keeps a docstring's as parsed.
    helpers = cst.parse_module((helper_text + _plan_data(plan_for_data, names.g)).replace(
        "\n", new_module.default_newline))
    helper_body = [s for i, s in enumerate(helpers.body) if not (i < len(already) and already[i])]
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


def _drop_unused_autoreparam_imports(new_module: cst.Module, module: cst.Module, global_scope, facts) -> cst.Module:
    """Without the removed ``@autoreparam.auto`` decorators, drop the top-level autoreparam imports
    that nothing else reads (the emitted file must not need autoreparam at run time)."""
    if not facts.auto_decorators or not isinstance(global_scope, GlobalScope):
        return new_module
    removed = set()
    for dec in facts.auto_decorators:
        removed |= {id(n) for n in _walk(dec)}
    unused = set()
    for assignment in global_scope.assignments:
        node = getattr(assignment, "node", None)
        if not isinstance(node, (cst.Import, cst.ImportFrom)):
            continue
        qualified = {q.name for q in global_scope.get_qualified_names_for(assignment.name)}
        if not any(q == "autoreparam" or q.startswith("autoreparam.") for q in qualified):
            continue
        if all(id(ref.node) in removed for ref in assignment.references):
            unused.add((id(node), assignment.name))
    if not unused:
        return new_module
    body = []
    carried: list = []
    for before, after in zip(module.body, new_module.body):
        statement = _without_aliases(before, after, unused)
        if statement is None:
            carried.extend(after.leading_lines)
            continue
        if carried:
            statement = statement.with_changes(leading_lines=(*carried, *statement.leading_lines))
            carried = []
        body.append(statement)
    return new_module.with_changes(body=body)


def _without_aliases(before, after, unused):
    """A top-level import statement without its unused autoreparam names (None when none is left)."""
    if not (isinstance(before, cst.SimpleStatementLine) and len(before.body) == 1
            and isinstance(before.body[0], (cst.Import, cst.ImportFrom))):
        return after
    imp = before.body[0]
    if isinstance(imp.names, cst.ImportStar):
        return after

    def bound(alias):  # the name an import alias binds, as the scope analysis spells it
        return alias.asname.name.value if alias.asname is not None else _dotted(alias.name)

    keep = [a for a in imp.names if (id(imp), bound(a)) not in unused]
    if len(keep) == len(imp.names):
        return after
    if not keep:
        return None
    keep[-1] = keep[-1].with_changes(comma=imp.names[-1].comma)  # the list keeps its closing layout
    return after.with_changes(body=[after.body[0].with_changes(names=keep)])


def _walk(node):
    yield node
    for child in node.children:
        yield from _walk(child)


def _literal_sites(facts: _SourceFacts, wrapper: MetadataWrapper) -> dict[str, tuple[str, int]]:
    """Site name -> (function, line) of every literal numpyro.sample call in a module."""
    visitor = _LiteralSites(facts.sample_calls)
    wrapper.visit(visitor)
    return visitor.found


class _LiteralSites(cst.CSTVisitor):
    METADATA_DEPENDENCIES = (PositionProvider,)

    def __init__(self, sample_calls):
        super().__init__()
        self.sample_calls = sample_calls
        self.functions: list[str] = []
        self.found: dict[str, tuple[str, int]] = {}

    def visit_FunctionDef(self, node):
        self.functions.append(node.name.value)

    def leave_FunctionDef(self, node):
        self.functions.pop()

    def visit_Call(self, node):
        if node in self.sample_calls and (name := _site_name(node)) is not None and name not in self.found:
            where = self.functions[-1] if self.functions else "<module>"
            self.found[name] = (where, self.get_metadata(PositionProvider, node).start.line)


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
    if not isinstance(plan, Plan):
        raise InputError(f"emit_config: plan must be an autoreparam.Plan, got {type(plan).__name__}")
    plan.check()
    data = json.dumps(plan.to_json())
    lines = [
        '"""Reparam config for ' + function + ', generated by `autoreparam analyze --emit config`.',
        "",
        "    reparam_model = reparameterize(model)",
        '"""',
        "",
        "import json",
        "",
        "from autoreparam import Plan",
        "from autoreparam.reparam import apply_config, build_config",
        "",
        f"PLAN = Plan.from_json(json.loads({data!r}))",
        "",
        "",
        "def make_config(learn=True):",
        '    """The NumPyro reparam config (site -> Reparam); apply it with apply_config(model, config)."""',
        "    return build_config(PLAN, learn=learn)",
        "",
        "",
        "def reparameterize(model, learn=True):",
        '    """``model`` with the plan applied, ready for SVI or MCMC."""',
        "    return apply_config(model, make_config(learn))",
        "",
    ]
    return "\n".join(lines)
