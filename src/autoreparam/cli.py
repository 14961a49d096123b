"""The ``autoreparam`` command line: argument parsing, loading the model file, printing, exit codes."""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import sys
import uuid
from pathlib import Path
from typing import Sequence

from .errors import AutoreparamError, InputError
from .files import write_atomic
from .trace import describe_exception

__all__ = ["main", "load_model", "model_inputs"]


def load_module(path: str):
    """Import a Python file as a fresh module; InputError if it is missing or does not import."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{path}: no such file (expected a Python file defining a NumPyro model)")
    if file.suffix != ".py":
        raise InputError(f"{path}: expected a Python file ending in .py")
    name = f"_autoreparam_user_{file.stem}_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(file.parent.resolve()))
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(name, None)
        raise InputError(f"{path}:{exc.lineno}: syntax error: {exc.msg}") from exc
    except Exception as exc:
        sys.modules.pop(name, None)
        raise InputError(f"{path}: importing it raised {describe_exception(exc)}") from exc
    finally:
        sys.path.remove(str(file.parent.resolve()))
    return module


def load_model(module, path: str, name: str | None):
    """The model: ``name`` if given, else the one ``@autoreparam.auto`` function, else ``model``.

    A function decorated with ``@autoreparam.auto`` is analysed as the model it wraps.
    """
    if name is not None:
        fn = getattr(module, name, None)
        if not callable(fn):
            raise InputError(f"{path}: no function named '{name}' (given by --model)")
        return getattr(fn, "model", fn) if hasattr(fn, "plan_for") else fn
    decorated = [n for n, v in vars(module).items() if callable(v) and hasattr(v, "plan_for")
                 and getattr(v, "__module__", None) == module.__name__]
    if len(decorated) == 1:
        return getattr(module, decorated[0]).model
    if len(decorated) > 1:
        raise InputError(f"{path}: several functions are decorated with @autoreparam.auto "
                         f"({', '.join(decorated)}); pass --model NAME")
    fn = getattr(module, "model", None)
    if callable(fn):
        return fn
    candidates = [n for n, v in vars(module).items()
                  if inspect.isfunction(v) and v.__module__ == module.__name__ and not n.startswith("_")]
    listed = ", ".join(candidates) if candidates else "none"
    raise InputError(f"{path}: no @autoreparam.auto function and no function named 'model'; "
                     f"pass --model NAME (functions defined there: {listed})")


def model_inputs(module, path: str, args_expr: str | None) -> tuple[tuple, dict]:
    """Example inputs: ``--args EXPR``, else ``model_args()`` from the module, else none."""
    if args_expr is not None:
        try:
            value = eval(args_expr, vars(module))  # noqa: S307 - the user's own expression, by design
        except Exception as exc:
            raise InputError(f"--args {args_expr!r}: evaluating it in {path} raised "
                             f"{describe_exception(exc)}") from exc
        source = f"--args {args_expr!r}"
    elif callable(getattr(module, "model_args", None)):
        try:
            value = module.model_args()
        except Exception as exc:
            raise InputError(f"{path}: model_args() raised {describe_exception(exc)}") from exc
        source = f"{path}: model_args()"
        if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], (tuple, list))
                and isinstance(value[1], dict)):
            raise InputError(f"{source} must return a pair (args, kwargs), got {_kind(value)}")
    else:
        return (), {}
    if _is_pair(value):
        return tuple(value[0]), dict(value[1])
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], (tuple, list)) \
            and isinstance(value[1], dict):
        return tuple(value[0]), dict(value[1])
    if isinstance(value, tuple):
        return value, {}
    raise InputError(f"{source} must give a tuple of positional arguments or a pair (args, kwargs), "
                     f"got {_kind(value)} (for one argument write a 1-tuple: 'x,')")


def _is_pair(value) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], (tuple, list)) \
        and isinstance(value[1], dict)


def _inputs_source(module, path: str, args_expr: str | None) -> str:
    if args_expr is not None:
        return f"the inputs from --args {args_expr!r}"
    if callable(getattr(module, "model_args", None)):
        return f"the inputs from model_args() in {path}"
    return ("no arguments (there is no --args and no model_args() in the file; pass --args EXPR or "
            "define model_args() returning (args, kwargs))")


def _kind(value) -> str:
    return type(value).__name__


EXAMPLES = {
    "analyze": "example: autoreparam analyze examples/tensor_model.py --graph graph.png",
    "compare": "example: autoreparam compare examples/county_covariate.py --steps 2000 --plot compare.png",
}


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="Python file that defines the model")
    p.add_argument("--model", help="name of the model function (default: the @autoreparam.auto "
                                   "function, else the function named model)")
    p.add_argument("--args", dest="args_expr", metavar="EXPR",
                   help="Python expression, evaluated in the file's namespace, giving a tuple of "
                        "positional arguments or a pair (args, kwargs) (default: model_args() if defined)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="autoreparam", description="Find the likelihood-invariant directions of a NumPyro model "
        "and reparameterize it.", epilog="\n".join(EXAMPLES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"autoreparam {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="report the additive terms, invariant pairs, funnels and plan of a model",
                       epilog=EXAMPLES["analyze"])
    _add_model_options(a)
    a.add_argument("--json", action="store_true", help="print the report and plan as JSON and nothing else")
    a.add_argument("--emit", choices=("source", "config"),
                   help="write the reparameterized model source, or a module building the reparam config")
    a.add_argument("-o", "--output", metavar="OUT", help="file to write with --emit (default: stdout)")
    a.add_argument("--in-place", action="store_true",
                   help="with --emit source: rewrite FILE itself, keeping a copy as FILE.bak")
    a.add_argument("--graph", metavar="OUT", help="draw the site graph to OUT.png, OUT.svg or OUT.dot")
    a.add_argument("--fail-on-invariance", action="store_true",
                   help="exit 1 when the model has a likelihood-invariant pair (for CI)")
    c = sub.add_parser("compare", help="run SVI on the original and the reparameterized model side by side",
                       epilog=EXAMPLES["compare"])
    _add_model_options(c)
    c.add_argument("--steps", type=int, default=2000, help="SVI steps for each model (default 2000)")
    c.add_argument("--guide", default="AutoNormal", choices=("AutoNormal", "AutoDiagonalNormal",
                                                             "AutoLowRankMultivariateNormal"))
    c.add_argument("--plot", metavar="OUT.png", help="draw the ELBO curves and posterior sds to a PNG/SVG")
    c.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def _fail(exc: BaseException, debug: bool, code: int = 2) -> int:
    if debug:
        import traceback

        traceback.print_exception(exc)
    print(f"autoreparam: error: {exc}", file=sys.stderr)
    return code


def _load(args):
    """Module, model and inputs from the command line; InputError on anything wrong."""
    module = load_module(args.file)
    model = load_model(module, args.file, args.model)
    margs, mkwargs = model_inputs(module, args.file, args.args_expr)
    return module, model, margs, mkwargs


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    0 success; 1 the analysis found what ``--fail-on-invariance`` asked to fail on;
    2 usage or input error (including a model that cannot be run or analysed on its inputs).
    """
    args = _parser().parse_args(argv)
    if args.command == "compare":
        return _compare(args)
    from .analysis import analyze

    try:
        module, model, margs, mkwargs = _load(args)
        try:
            report = analyze(model, *margs, **mkwargs)
        except AutoreparamError as exc:
            raise InputError(f"{args.file}: {exc} [called with {_inputs_source(module, args.file, args.args_expr)}]") \
                from exc
        plan = report.plan
        if args.graph:
            from .draw import draw_graph

            if args.json:
                raise InputError("--graph and --json are exclusive (--json prints only JSON)")
            draw_graph(report, args.graph)
    except AutoreparamError as exc:
        return _fail(exc, args.debug)
    except OSError as exc:
        return _fail(InputError(f"cannot write {exc.filename}: {exc.strerror}"), args.debug)
    if args.emit:
        code = _emit(args, model, plan)
        if code:
            return code
    else:
        try:
            if args.json:
                json.dump({**report.to_json(), "plan": plan.to_json()}, sys.stdout, indent=2)
                sys.stdout.write("\n")
            else:
                print(report)
                print()
                print(plan)
                if args.graph:
                    print(f"\nsite graph written to {args.graph}")
            sys.stdout.flush()
        except BrokenPipeError:  # e.g. piped into head
            sys.stdout = None
    if args.fail_on_invariance and report.additive():
        print(f"autoreparam: {args.file}: {len(report.additive())} likelihood-invariant pair(s) "
              "(--fail-on-invariance)", file=sys.stderr)
        return 1
    return 0


def _compare(args) -> int:
    from .compare import compare

    try:
        module, model, margs, mkwargs = _load(args)
        if args.plot and Path(args.plot).suffix.lower() not in (".png", ".svg"):
            raise InputError(f"--plot {args.plot}: expected a file ending in .png or .svg")
        try:
            result = compare(model, margs, mkwargs, steps=args.steps, guide=args.guide,
                             progress=not args.no_progress)
        except InputError:
            raise
        except AutoreparamError as exc:
            raise InputError(f"{args.file}: {exc} [called with {_inputs_source(module, args.file, args.args_expr)}]") \
                from exc
        print(result.table())
        if args.plot:
            result.plot(args.plot)
            print(f"\nplot written to {args.plot}")
    except AutoreparamError as exc:
        return _fail(exc, args.debug)
    except OSError as exc:
        return _fail(InputError(f"cannot write {exc.filename}: {exc.strerror}"), args.debug)
    return 0


def _emit(args, model, plan) -> int:
    from .emit import emit_config, emit_source

    source_path = Path(args.file)
    if args.in_place and args.output:
        print("autoreparam: error: --in-place and -o are exclusive", file=sys.stderr)
        return 2
    if args.in_place and args.emit != "source":
        print("autoreparam: error: --in-place only applies to --emit source", file=sys.stderr)
        return 2
    if args.output and Path(args.output).resolve() == source_path.resolve():
        print(f"autoreparam: error: -o {args.output} is the input file; use --in-place to rewrite it "
              "(a .bak copy is kept)", file=sys.stderr)
        return 2
    name = getattr(model, "__name__", "model")
    try:
        if args.emit == "source":
            result = emit_source(source_path.read_text(), name, plan)
            text, warnings = result.source, result.warnings
        else:
            text, warnings = emit_config(plan, function=name), []
    except AutoreparamError as exc:
        print(f"autoreparam: error: {args.file}: {exc}", file=sys.stderr)
        return 2
    for w in warnings:
        print(f"autoreparam: warning: {args.file}: {w}", file=sys.stderr)
    try:
        if args.in_place:
            backup = source_path.with_name(source_path.name + ".bak")
            write_atomic(backup, source_path.read_text())
            write_atomic(source_path, text)
        elif args.output:
            write_atomic(Path(args.output), text)
        else:
            sys.stdout.write(text)
    except OSError as exc:
        print(f"autoreparam: error: cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
