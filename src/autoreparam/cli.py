"""The ``autoreparam`` command line: argument parsing, loading the model file, printing, exit codes."""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
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
    except (Exception, SystemExit) as exc:
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
    """Print one error line (and with --debug the traceback of what caused it); return ``code``."""
    if debug:
        import traceback

        traceback.print_exception(exc.__cause__ or exc)
    print(f"autoreparam: error: {exc}", file=sys.stderr)
    return code


def _check_writable(path: str, option: str) -> None:
    """Refuse an output path before any work is done or any file is written."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise InputError(f"{option} {path}: cannot write there: it is a directory, not a file")
    if parent.exists() and not parent.is_dir():
        raise InputError(f"{option} {path}: cannot write there: {parent} is a file, not a folder")
    if not parent.is_dir():
        raise InputError(f"{option} {path}: cannot write there: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{option} {path}: cannot write there: folder {parent} is not writable")


def _write_error(exc: OSError) -> InputError:
    err = InputError(f"cannot write {exc.filename}: {exc.strerror or exc}")
    err.__cause__ = exc
    return err


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
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else 2
    if args.command == "compare":
        return _compare(args)
    try:
        _check_analyze_options(args)
    except AutoreparamError as exc:
        return _fail(exc, args.debug)
    if args.emit == "source":
        already = _already_emitted(args)
        if already is not None:
            return already
    from .analysis import analyze

    try:
        module, model, margs, mkwargs = _load(args)
        try:
            report = analyze(model, *margs, **mkwargs)
        except AutoreparamError as exc:
            raise InputError(f"{args.file}: {exc} [called with {_inputs_source(module, args.file, args.args_expr)}]") \
                from exc
        plan = report.plan
        emitted = _emit_text(args, model, plan) if args.emit else None
        if args.graph:
            from .draw import draw_graph

            draw_graph(report, args.graph)
        if emitted is not None:
            _write_emitted(args, emitted)
    except AutoreparamError as exc:
        return _fail(exc, args.debug)
    except OSError as exc:
        return _fail(_write_error(exc), args.debug)
    if not args.emit:
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


def _check_analyze_options(args) -> None:
    if args.json and (args.emit or args.graph):
        raise InputError(f"--json prints only the JSON report; it cannot be combined with "
                         f"{'--emit' if args.emit else '--graph'}")
    if (args.output or args.in_place) and not args.emit:
        raise InputError(f"{'-o' if args.output else '--in-place'} needs --emit source or --emit config")
    if args.in_place and args.output:
        raise InputError("--in-place and -o are exclusive")
    if args.in_place and args.emit != "source":
        raise InputError("--in-place only applies to --emit source")
    if args.output and Path(args.output).resolve() == Path(args.file).resolve():
        raise InputError(f"-o {args.output} is the input file; use --in-place to rewrite it (a .bak copy is kept)")
    if args.graph:
        if Path(args.graph).suffix.lower() not in (".png", ".svg", ".dot"):
            raise InputError(f"--graph {args.graph}: expected a file ending in .png, .svg or .dot")
        _check_writable(args.graph, "--graph")
    if args.output:
        _check_writable(args.output, "-o")


def _compare(args) -> int:
    from .compare import compare

    try:
        if args.plot:
            if Path(args.plot).suffix.lower() not in (".png", ".svg"):
                raise InputError(f"--plot {args.plot}: expected a file ending in .png or .svg")
            _check_writable(args.plot, "--plot")
        module, model, margs, mkwargs = _load(args)
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
        return _fail(_write_error(exc), args.debug)
    return 0


def _read_source(path: Path) -> str:
    return path.read_bytes().decode("utf-8")  # no newline translation: CRLF files round-trip


def _already_emitted(args) -> int | None:
    """Exit code for a FILE that autoreparam already rewrote (nothing to do), else None."""
    from .emit import MARKER

    path = Path(args.file)
    try:
        source = _read_source(path)
    except (OSError, UnicodeDecodeError):
        return None  # the normal loading path reports it
    if MARKER not in source:
        return None
    print(f"autoreparam: warning: {args.file}: already reparameterized by autoreparam; nothing to do",
          file=sys.stderr)
    if not args.in_place and not args.output:
        sys.stdout.write(source)
    elif args.output and Path(args.output).resolve() != path.resolve():
        write_atomic(Path(args.output), source)
    return 0


def _emit_text(args, model, plan) -> str:
    """The text that --emit writes; warnings go to stderr."""
    from .emit import emit_config, emit_source

    name = getattr(model, "__name__", "model")
    try:
        if args.emit == "source":
            result = emit_source(_read_source(Path(args.file)), name, plan)
            text, warnings = result.source, result.warnings
        else:
            text, warnings = emit_config(plan, function=name), []
    except AutoreparamError as exc:
        raise InputError(f"{args.file}: {exc}") from exc
    for w in warnings:
        print(f"autoreparam: warning: {args.file}: {w}", file=sys.stderr)
    return text


def _write_emitted(args, text: str) -> None:
    source_path = Path(args.file)
    if args.in_place:
        write_atomic(source_path.with_name(source_path.name + ".bak"), _read_source(source_path))
        write_atomic(source_path, text)
    elif args.output:
        write_atomic(Path(args.output), text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    sys.exit(main())
