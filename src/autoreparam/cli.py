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
    """The model function: ``name`` if given, else a function called ``model``."""
    if name is not None:
        fn = getattr(module, name, None)
        if not callable(fn):
            raise InputError(f"{path}: no function named '{name}' (given by --model)")
        return fn
    fn = getattr(module, "model", None)
    if callable(fn):
        return fn
    candidates = [n for n, v in vars(module).items()
                  if inspect.isfunction(v) and v.__module__ == module.__name__ and not n.startswith("_")]
    listed = ", ".join(candidates) if candidates else "none"
    raise InputError(f"{path}: no function named 'model'; pass --model NAME (functions defined there: {listed})")


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
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], (tuple, list)) \
            and isinstance(value[1], dict):
        return tuple(value[0]), dict(value[1])
    if isinstance(value, tuple):
        return value, {}
    raise InputError(f"{source} must give a tuple of positional arguments or a pair (args, kwargs), "
                     f"got {_kind(value)} (for one argument write a 1-tuple: 'x,')")


def _kind(value) -> str:
    return type(value).__name__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autoreparam", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="report the additive terms, invariant pairs and funnels of a model")
    a.add_argument("file", help="Python file that defines the model")
    a.add_argument("--model", help="name of the model function (default: model)")
    a.add_argument("--args", dest="args_expr", metavar="EXPR",
                   help="Python expression, evaluated in the file's namespace, giving a tuple of "
                        "positional arguments or a pair (args, kwargs) (default: model_args() if defined)")
    a.add_argument("--json", action="store_true", help="print the report as JSON and nothing else")
    a.add_argument("--emit", choices=("source", "config"),
                   help="write the reparameterized model source, or a module building the reparam config")
    a.add_argument("-o", "--output", metavar="OUT", help="file to write with --emit (default: stdout)")
    a.add_argument("--in-place", action="store_true",
                   help="with --emit source: rewrite FILE itself, keeping a copy as FILE.bak")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 analysis error, 2 bad input)."""
    args = _parser().parse_args(argv)
    from .analysis import analyze

    try:
        module = load_module(args.file)
        model = load_model(module, args.file, args.model)
        margs, mkwargs = model_inputs(module, args.file, args.args_expr)
        report = analyze(model, *margs, **mkwargs)
        plan = report.plan
    except InputError as exc:
        print(f"autoreparam: error: {exc}", file=sys.stderr)
        return 2
    except AutoreparamError as exc:
        print(f"autoreparam: error: {args.file}: {exc}", file=sys.stderr)
        return 1
    if args.emit:
        return _emit(args, model, plan)
    try:
        if args.json:
            json.dump({**report.to_json(), "plan": plan.to_json()}, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print(report)
            print()
            print(plan)
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into head
        sys.stdout = None
    return 0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.autoreparam-tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
            _write_atomic(backup, source_path.read_text())
            _write_atomic(source_path, text)
        elif args.output:
            _write_atomic(Path(args.output), text)
        else:
            sys.stdout.write(text)
    except OSError as exc:
        print(f"autoreparam: error: cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
