"""The ``autoreparam`` command line: argument parsing, loading the model file, printing, exit codes."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import json
import os
import signal
import sys
import threading
import uuid
from pathlib import Path
from typing import Sequence

from .errors import AutoreparamError, InputError
from .files import backup_copy, write_atomic

__all__ = ["main", "load_model", "model_inputs"]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SystemExit) and exc.code is None:  # exit() or sys.exit(): not "SystemExit: None"
        return "SystemExit"
    from .trace import describe_exception  # imports JAX: not at the top (see main)

    return describe_exception(exc)


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
        raise InputError(f"{path}: importing it raised {_describe(exc)}") from exc
    finally:
        sys.path.remove(str(file.parent.resolve()))
    return module


def _is_reparameterized(value) -> bool:
    """``value`` is a model from ``autoreparam.reparameterize`` (or ``@autoreparam.auto``).

    Looked up, not imported: a module that made one has imported ``autoreparam.api`` (and JAX).
    """
    api = sys.modules.get(f"{__package__}.api")
    return api is not None and isinstance(value, api.ReparameterizedModel)


def load_model(module, path: str, name: str | None):
    """The model: ``name`` if given, else the one ``@autoreparam.auto`` function, else ``model``.

    A function decorated with ``@autoreparam.auto`` is analysed as the model it wraps.
    """
    if name is not None:
        fn = getattr(module, name, None)
        if not callable(fn):
            raise InputError(f"{path}: no function named '{name}' (given by --model)")
        return fn.model if _is_reparameterized(fn) else fn
    decorated = [n for n, v in vars(module).items() if _is_reparameterized(v)
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
        except (Exception, SystemExit) as exc:
            raise InputError(f"--args {args_expr!r}: evaluating it in {path} raised "
                             f"{_describe(exc)}") from exc
        source = f"--args {args_expr!r}"
    elif callable(getattr(module, "model_args", None)):
        try:
            value = module.model_args()
        except (Exception, SystemExit) as exc:
            raise InputError(f"{path}: model_args() raised {_describe(exc)}") from exc
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
    p.add_argument("--unwrap", action="store_true",
                   help="analyse the model under its handlers.reparam wrapper (the plan then replaces the wrapper)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser (and, through ``add_subparsers``, its subcommands) whose usage errors are
    two lines: a short usage line and the error."""

    def error(self, message: str):
        self.exit(2, f"{self.short_usage()}\nautoreparam: error: {' '.join(message.split())}\n")

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:  # argparse leaves a subcommand's unknown options to the top parser; blame the subcommand
            commands = self._commands()
            parser = commands.choices.get(getattr(parsed, "command", None), self) if commands else self
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def _commands(self):
        return next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)

    def short_usage(self) -> str:
        commands = self._commands()
        if commands:
            what = "{" + ",".join(commands.choices) + "} ..."
        else:
            positionals = [a.metavar or a.dest.upper() for a in self._actions if not a.option_strings]
            what = " ".join(positionals + ["[options]"])
        return f"usage: {self.prog} {what} (see {self.prog} --help)"


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(
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
                   help="with --emit source: rewrite FILE itself, keeping a copy as FILE.bak (or FILE.bak.1, ... if taken)")
    a.add_argument("--graph", metavar="OUT", help="draw the site graph to OUT.png, OUT.svg or OUT.dot")
    a.add_argument("--fail-on-invariance", action="store_true",
                   help="exit 1 when the model has a likelihood-invariant pair (for CI)")
    c = sub.add_parser("compare", help="run SVI on the original and the reparameterized model side by side",
                       epilog=EXAMPLES["compare"])
    _add_model_options(c)
    c.add_argument("--steps", type=int, default=2000, help="SVI steps for each model (default 2000)")
    c.add_argument("--guide", default="AutoNormal", choices=("AutoNormal", "AutoDiagonalNormal",
                                                             "AutoLowRankMultivariateNormal", "hybrid"),
                   help="guide family for both models; 'hybrid': AutoNormal on both and autoreparam's hybrid "
                        "(q(theta) Gaussian, the Gaussian block exact) as a third column")
    c.add_argument("--plot", metavar="OUT.png", help="draw the ELBO curves and posterior sds to a PNG/SVG")
    c.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    c.add_argument("--mcmc", action="store_true",
                   help="run NUTS instead of SVI: original vs offsets vs the Gaussian block integrated out")
    c.add_argument("--chains", type=int, default=2, help="with --mcmc: chains, run one after another (default 2)")
    c.add_argument("--warmup", type=int, default=500, help="with --mcmc: warm-up draws per chain (default 500)")
    c.add_argument("--samples", type=int, default=500, help="with --mcmc: draws per chain (default 500)")
    return p


def _fail(exc: BaseException, debug: bool, code: int = 2) -> int:
    """Print one error line (and with --debug the traceback of what caused it); return ``code``."""
    if debug:
        import traceback

        traceback.print_exception(exc.__cause__ or exc)
    print(f"autoreparam: error: {_one_line(str(exc))}", file=sys.stderr)
    return code


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


class _Run:
    """What the command is doing now, what it has written, and whether Ctrl-C was pressed.

    ``interrupted`` records a Ctrl-C even when something swallowed its KeyboardInterrupt: JAX
    registers a garbage-collection callback, and an exception raised inside a gc callback (or a
    ``__del__``) is only printed as "Exception ignored"; a C extension being imported turns it into
    an ImportError. The run checks the flag before each output, so it still stops writing nothing.
    """

    def __init__(self):
        self.stage = "starting"
        self.interrupted = False
        self.deferring = False  # while JAX is imported: a KeyboardInterrupt there can crash it
        self.written: list[str] = []

    def enter(self, stage: str) -> None:
        """Stop here if Ctrl-C was pressed; else note what the command does next."""
        self.check()
        self.stage = stage

    def check(self) -> None:
        if self.interrupted:
            raise KeyboardInterrupt

    def interrupted_exit(self) -> int:
        done = f"; already written: {', '.join(self.written)}" if self.written else "; nothing written"
        print(f"autoreparam: interrupted (Ctrl-C) while {self.stage}{done}", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _watching_interrupts(run: _Run):
    """Record every Ctrl-C in ``run``, even one that user or library code swallows."""

    def on_sigint(signum, frame):
        if run.deferring and not run.interrupted:  # the run stops once the import is done
            run.interrupted = True
            return
        run.interrupted = True
        raise KeyboardInterrupt

    previous_hook = sys.unraisablehook

    def on_unraisable(info):
        if isinstance(info.exc_value, KeyboardInterrupt):  # swallowed in a gc callback or __del__
            run.interrupted = True
            return  # reported as one line when the run stops
        previous_hook(info)

    handler = None
    if threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not if SIGINT is ignored
        handler = signal.signal(signal.SIGINT, on_sigint)
    sys.unraisablehook = on_unraisable
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        if handler is not None:
            signal.signal(signal.SIGINT, handler)


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


def _load(args, run: _Run):
    """Module, model and inputs from the command line; InputError on anything wrong."""
    run.enter(f"importing {args.file}")
    module = load_module(args.file)
    model = load_model(module, args.file, args.model)
    if args.args_expr is not None:
        run.enter(f"evaluating --args {args.args_expr!r}")
    elif callable(getattr(module, "model_args", None)):
        run.enter(f"running model_args() in {args.file}")
    margs, mkwargs = model_inputs(module, args.file, args.args_expr)
    return module, model, margs, mkwargs


def _import_analysis(run: _Run) -> None:
    """Import JAX, NumPyro and the analysis with Ctrl-C deferred to the end of the import.

    A KeyboardInterrupt raised inside JAX's import is swallowed by its gc callback, turned into an
    ImportError by a C extension, or crashes it; a second Ctrl-C still interrupts at once.
    """
    run.enter("loading JAX and autoreparam")
    run.deferring = True
    try:
        from . import api, compare  # noqa: F401
    finally:
        run.deferring = False
    run.check()
    _use_compilation_cache(os.environ.get(COMPILATION_CACHE_VARIABLE))


COMPILATION_CACHE_VARIABLE = "AUTOREPARAM_COMPILATION_CACHE"


def _use_compilation_cache(path: str | None) -> None:
    """Opt-in: keep JAX's compiled programs in ``path`` (``AUTOREPARAM_COMPILATION_CACHE``), so
    that running the CLI again on a model of the same shapes skips XLA's compilations."""
    if not path:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(Path(path).expanduser()))
    # Every program, however small or quick to compile: the analysis compiles many small ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    0 success; 1 the analysis found what ``--fail-on-invariance`` asked to fail on;
    2 usage or input error (including a model that cannot be run or analysed on its inputs, and
    user code that calls ``sys.exit``); 130 Ctrl-C. Errors are one line on stderr.
    """
    run = _Run()
    debug = False
    with _watching_interrupts(run):
        try:
            try:
                args = _parser().parse_args(argv)
            except SystemExit as exc:  # --help, --version and usage errors
                return exc.code if isinstance(exc.code, int) else 2
            debug = args.debug
            code = _compare(args, run) if args.command == "compare" else _analyze(args, run)
            run.check()
            return code
        except KeyboardInterrupt:
            return run.interrupted_exit()
        except SystemExit as exc:  # user code exited where no narrower handler names it
            if run.interrupted:
                return run.interrupted_exit()
            return _fail(InputError(f"{_describe(exc)} raised while {run.stage}"), debug)
        except AutoreparamError as exc:
            if run.interrupted:
                return run.interrupted_exit()
            return _fail(exc, debug)
        except OSError as exc:
            if run.interrupted:
                return run.interrupted_exit()
            return _fail(_write_error(exc), debug)
        except Exception:
            if run.interrupted:  # e.g. an import that turned Ctrl-C into an ImportError
                return run.interrupted_exit()
            raise


def _analyze(args, run: _Run) -> int:
    _check_analyze_options(args)
    _import_analysis(run)
    if args.emit == "source":
        already = _already_emitted(args, run)
        if already is not None:
            return already
    from .api import analyze

    module, model, margs, mkwargs = _load(args, run)
    run.enter(f"analysing the model in {args.file}")
    try:
        report = analyze(model, *margs, unwrap=_unwrap(args, model), **mkwargs)
        plan = report.plan
    except AutoreparamError as exc:
        raise InputError(f"{args.file}: {exc} [called with {_inputs_source(module, args.file, args.args_expr)}]") \
            from exc
    except SystemExit as exc:
        raise InputError(f"{args.file}: the model raised {_describe(exc)} during the analysis "
                         f"[called with {_inputs_source(module, args.file, args.args_expr)}]") from exc
    emitted = _emit_text(args, model, plan) if args.emit else None
    if args.graph:
        from .draw import draw_graph

        run.enter(f"writing {args.graph}")
        draw_graph(report, args.graph)
        run.written.append(str(args.graph))
    if emitted is not None:
        _write_emitted(args, emitted, run)
    if not args.emit:
        run.enter("printing the report")
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
        print(f"autoreparam: {args.file}: {len(report.grouped_pairs())} likelihood-invariant pair(s) "
              "(--fail-on-invariance)", file=sys.stderr)
        return 1
    return 0


def _unwrap(args, model) -> bool:
    """--unwrap, with a warning on stderr when the model has no wrapper to strip."""
    if not args.unwrap:
        return False
    from .api import unwrap_model

    if not unwrap_model(model)[1]:
        print(f"autoreparam: warning: {args.file}: --unwrap: the model has no handlers.reparam wrapper; "
              "analysed as it is", file=sys.stderr)
        return False
    return True


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
    if args.in_place and Path(args.file).is_file():  # a missing FILE is reported when loading it
        _check_writable(os.path.realpath(args.file), "--in-place")


def _compare(args, run: _Run) -> int:
    if args.plot:
        if Path(args.plot).suffix.lower() not in (".png", ".svg"):
            raise InputError(f"--plot {args.plot}: expected a file ending in .png or .svg")
        _check_writable(args.plot, "--plot")
    _import_analysis(run)
    from .compare import compare

    if args.mcmc and args.plot:
        raise InputError("--plot: not available with --mcmc (the MCMC comparison is a table)")
    module, model, margs, mkwargs = _load(args, run)
    run.enter(f"comparing {'MCMC runs' if args.mcmc else 'SVI fits'} of the model in {args.file}")
    try:
        if args.mcmc:
            from .compare import compare_mcmc

            result = compare_mcmc(model, margs, mkwargs, warmup=args.warmup, samples=args.samples,
                                  chains=args.chains, progress=not args.no_progress, unwrap=_unwrap(args, model))
        else:
            result = compare(model, margs, mkwargs, steps=args.steps, guide=args.guide,
                             progress=not args.no_progress, unwrap=_unwrap(args, model))
    except InputError:
        raise
    except AutoreparamError as exc:
        raise InputError(f"{args.file}: {exc} [called with {_inputs_source(module, args.file, args.args_expr)}]") \
            from exc
    except SystemExit as exc:
        raise InputError(f"{args.file}: the model raised {_describe(exc)} during compare "
                         f"[called with {_inputs_source(module, args.file, args.args_expr)}]") from exc
    run.enter("printing the comparison")
    print(result.table())
    if args.plot:
        run.enter(f"writing {args.plot}")
        result.plot(args.plot)
        run.written.append(str(args.plot))
        print(f"\nplot written to {args.plot}")
    return 0


def _read_source(path: Path) -> str:
    return path.read_bytes().decode("utf-8")  # no newline translation: CRLF files round-trip


def _already_emitted(args, run: _Run) -> int | None:
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
        run.enter(f"writing {args.output}")
        write_atomic(Path(args.output), source)
        run.written.append(str(args.output))
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


def _write_emitted(args, text: str, run: _Run) -> None:
    if args.in_place:
        run.enter(f"rewriting {args.file}")
        _rewrite_in_place(Path(args.file), text)
        run.written.append(str(args.file))
    elif args.output:
        run.enter(f"writing {args.output}")
        write_atomic(Path(args.output), text)
        run.written.append(str(args.output))
    else:
        run.enter("printing the emitted code")
        sys.stdout.write(text)


def _rewrite_in_place(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` atomically, first copying it to a backup name no file has.

    If the rewrite fails (or is interrupted) the original is intact and the backup is removed.
    """
    backup = backup_copy(path)
    try:
        write_atomic(path, text)
    except BaseException:
        # Remove the backup only while FILE still holds the original: an interrupt that lands after
        # the rename (FILE already rewritten) must not take the only copy of the original with it.
        if Path(path).read_bytes() == backup.read_bytes():
            backup.unlink(missing_ok=True)
        raise
    print(f"autoreparam: rewrote {path}; the original is kept in {backup}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
