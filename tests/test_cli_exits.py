"""Exit codes, Ctrl-C, user code that exits, usage errors and ``--in-place`` safety of ``cli.main``.

Every failure is one line on stderr; exit 2 for bad input (including user code calling
``sys.exit``), 130 for Ctrl-C; never a half-written, lost or overwritten file.
"""

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from autoreparam.cli import main
from emit_support import case_path

TINY = """\
import sys
import numpy as np
import numpyro
import numpyro.distributions as dist

GROUP = np.array([0, 1, 2, 0, 1, 2])


def model(group, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    # IN THE MODEL
    with numpyro.plate("groups", 3):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", group.shape[0]):
        numpyro.sample("y", dist.Normal(mu + a[group], 0.5), obs=y)


def model_args():
    # IN MODEL_ARGS
    return (GROUP,), {"y": np.zeros(6, dtype=np.float32)}
"""


def tiny(import_time="", in_model_args="", in_model=""):
    """TINY with code run at import, in model_args() and in the model."""
    text = TINY.replace("    # IN MODEL_ARGS", textwrap.indent(in_model_args or "pass", "    "))
    text = text.replace("    # IN THE MODEL", textwrap.indent(in_model or "pass", "    "))
    return text + "\n" + import_time + "\n"


def files(directory):
    """The directory's entries, ignoring __pycache__ (importing the model may write bytecode)."""
    return sorted(f for f in os.listdir(directory) if f != "__pycache__")


def run(capsys, *argv):
    """``main(argv)``; a KeyboardInterrupt or SystemExit escaping it fails the test (not the run)."""
    try:
        code = main([str(a) for a in argv])
    except BaseException as exc:  # noqa: BLE001 - an escaping KeyboardInterrupt would stop pytest
        pytest.fail(f"main() let {type(exc).__name__}({exc}) escape instead of returning an exit code")
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err, start, *fragments):
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(start), lines[0]
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.fixture(autouse=True)
def ctrl_c_as_in_a_shell():
    """Ctrl-C tests need SIGINT as an interactive shell gives it: a run started in the background
    (``pytest &``) inherits SIGINT ignored, and then Python never raises KeyboardInterrupt."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        yield
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        yield


def sigint_default_in_child():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # the child's Python then installs its own handler


@pytest.fixture
def workdir(tmp_path):
    """A folder with an output folder in it; analyze runs ask for a graph and an emitted config."""
    (tmp_path / "out").mkdir()
    return tmp_path


def outputs(command, workdir):
    if command == "analyze":
        return ["--graph", workdir / "out" / "g.dot", "--emit", "config", "-o", workdir / "out" / "cfg.py"]
    return ["--plot", workdir / "out" / "p.png", "--steps", "5", "--no-progress"]


# -- user code that calls sys.exit: exit 2, one line naming where --------------------------------

EXITS = {
    # case: (file contents, extra argv, fragments of the error line)
    "args_exit": (tiny(), ["--args", "exit()"], ["--args 'exit()': evaluating it in ", "m.py raised SystemExit"]),
    "args_exit_0": (tiny(), ["--args", "exit(0)"], ["--args 'exit(0)'", "SystemExit: 0"]),
    "args_exit_5": (tiny(), ["--args", "exit(5)"], ["--args 'exit(5)'", "SystemExit: 5"]),
    "model_args_exit_0": (tiny(in_model_args="sys.exit(0)"), [], ["model_args() raised SystemExit: 0"]),
    "import_exit": (tiny(import_time="sys.exit('no data here')"), [],
                    ["importing it raised SystemExit: no data here"]),
    "model_exit": (tiny(in_model="sys.exit('stop in the model')"), [],
                   ["the model raised SystemExit: stop in the model", "model_args()"]),
    "model_exit_0": (tiny(in_model="sys.exit(0)"), [], ["the model raised SystemExit: 0"]),
}


@pytest.mark.parametrize("command", ["analyze", "compare"])
@pytest.mark.parametrize("case", EXITS)
def test_user_code_that_exits_is_an_input_error(capsys, workdir, command, case):
    contents, extra, fragments = EXITS[case]
    path = workdir / "m.py"
    path.write_text(contents)
    before = files(workdir)
    code, out, err = run(capsys, command, path, *extra, *outputs(command, workdir))
    assert code == 2
    assert out == ""
    line = one_line(err, "autoreparam: error: ", str(path), *fragments)
    assert "None" not in line
    assert files(workdir / "out") == []
    assert files(workdir) == before


# -- Ctrl-C: exit 130, one line, nothing written -------------------------------------------------

INTERRUPTS = {
    "at_import": dict(import_time="raise KeyboardInterrupt"),
    "in_model_args": dict(in_model_args="raise KeyboardInterrupt"),
    "in_the_model": dict(in_model="raise KeyboardInterrupt"),
}


@pytest.mark.parametrize("command", ["analyze", "compare"])
@pytest.mark.parametrize("case", INTERRUPTS)
def test_ctrl_c_in_user_code_stops_the_run(capsys, workdir, command, case):
    path = workdir / "m.py"
    path.write_text(tiny(**INTERRUPTS[case]))
    before = files(workdir)
    code, out, err = run(capsys, command, path, *outputs(command, workdir))
    assert code == 130
    assert out == ""
    one_line(err, "autoreparam: interrupted (Ctrl-C) while ", "nothing written")
    assert files(workdir / "out") == []
    assert files(workdir) == before


# A real SIGINT that something between the signal and the run swallows: JAX's garbage-collection
# callback (an exception inside a gc callback is only printed as "Exception ignored"), a broad
# except in some library, or a C extension's import turning it into an ImportError.
SWALLOWED = {
    "in_a_gc_callback": """
import gc
import signal

def _press_ctrl_c(phase, info):
    gc.callbacks.remove(_press_ctrl_c)
    signal.raise_signal(signal.SIGINT)

gc.callbacks.append(_press_ctrl_c)
gc.collect()
""",
    "by_a_broad_except": """
import signal
try:
    signal.raise_signal(signal.SIGINT)
except BaseException:
    pass
""",
    "turned_into_an_import_error": """
import signal
try:
    signal.raise_signal(signal.SIGINT)
except KeyboardInterrupt as exc:
    raise ImportError("numpy._core.multiarray failed to import") from exc
""",
}


@pytest.mark.parametrize("case", SWALLOWED)
def test_ctrl_c_swallowed_at_start_up_still_stops_the_run(capsys, workdir, case):
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own, as in a shell
    path = workdir / "m.py"
    path.write_text(tiny(import_time=SWALLOWED[case]))
    before = files(workdir)
    code, out, err = run(capsys, "analyze", path, *outputs("analyze", workdir))
    assert code == 130, err
    assert out == ""
    one_line(err, "autoreparam: interrupted (Ctrl-C) while importing ", str(path), "nothing written")
    assert files(workdir / "out") == []
    assert files(workdir) == before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # main() restored it


def test_ctrl_c_swallowed_in_the_model_stops_before_printing(capsys, workdir):
    path = workdir / "m.py"
    path.write_text(tiny(in_model=textwrap.dedent(SWALLOWED["by_a_broad_except"])))
    code, out, err = run(capsys, "analyze", path)
    assert code == 130, err
    assert out == ""
    one_line(err, "autoreparam: interrupted (Ctrl-C) while analysing the model in ", "nothing written")


# Ctrl-C while JAX is being imported, as a user pressing it right after starting the command: the
# signal is raised from a gc callback once JAX's import has begun (the callback then removes itself).
PRESS_CTRL_C_DURING_JAX_IMPORT = """
import gc, signal, sys

def press(phase, info):
    if phase == "stop" and "jax" in sys.modules:
        gc.callbacks.remove(press)
        signal.raise_signal(signal.SIGINT)

gc.callbacks.append(press)
from autoreparam.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_while_jax_is_imported_stops_the_command(workdir):
    path = workdir / "m.py"
    path.write_text(tiny())
    target = workdir / "out" / "cfg.py"
    proc = subprocess.run([sys.executable, "-c", PRESS_CTRL_C_DURING_JAX_IMPORT, "analyze", str(path),
                           "--emit", "config", "-o", str(target)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
                          preexec_fn=sigint_default_in_child)
    assert proc.returncode == 130, proc.stderr
    assert proc.stdout == ""
    one_line(proc.stderr, "autoreparam: interrupted (Ctrl-C) while loading JAX", "nothing written")
    assert files(workdir / "out") == []


def test_importing_the_command_line_does_not_import_jax():
    """So that main() watches for Ctrl-C before JAX's import starts."""
    code = "import sys, autoreparam.cli; print(sorted(m for m in ('jax', 'numpyro') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def _interrupt_replacing(monkeypatch, name, exc):
    """Make the final rename onto a file called ``name`` raise ``exc`` (a write failing at its end)."""
    original = Path.replace

    def replace(self, target):
        if Path(target).name == name:
            raise exc
        return original(self, target)

    monkeypatch.setattr(Path, "replace", replace)


@pytest.fixture
def model_file(tmp_path):
    """A copy of the crossed-effects case (fast to analyse and emit) in an otherwise empty folder."""
    path = tmp_path / "model.py"
    shutil.copyfile(case_path("crossed"), path)
    return path


def test_ctrl_c_while_writing_leaves_no_file(capsys, model_file, monkeypatch):
    target = model_file.parent / "emitted.py"
    _interrupt_replacing(monkeypatch, target.name, KeyboardInterrupt())
    code, out, err = run(capsys, "analyze", model_file, "--emit", "source", "-o", target)
    assert code == 130
    one_line(err, "autoreparam: interrupted (Ctrl-C) while writing ", str(target), "nothing written")
    assert files(model_file.parent) == ["model.py"]


def test_ctrl_c_while_rewriting_in_place_keeps_the_original(capsys, model_file, monkeypatch):
    original = model_file.read_bytes()
    _interrupt_replacing(monkeypatch, model_file.name, KeyboardInterrupt())
    code, out, err = run(capsys, "analyze", model_file, "--emit", "source", "--in-place")
    assert code == 130
    one_line(err, "autoreparam: interrupted (Ctrl-C) while rewriting ", str(model_file), "nothing written")
    assert model_file.read_bytes() == original
    assert files(model_file.parent) == ["model.py"]  # no backup, no temporary file


def test_ctrl_c_just_after_the_rename_keeps_the_backup(capsys, model_file, monkeypatch):
    """FILE is already rewritten when the interrupt lands: the backup is then the only copy of the
    original, so it stays."""
    original = model_file.read_bytes()
    replace = Path.replace

    def replace_then_interrupt(self, target):
        replace(self, target)
        if Path(target).name == model_file.name:
            raise KeyboardInterrupt

    monkeypatch.setattr(Path, "replace", replace_then_interrupt)
    code, out, err = run(capsys, "analyze", model_file, "--emit", "source", "--in-place")
    assert code == 130
    assert model_file.read_bytes() != original
    assert model_file.with_name("model.py.bak").read_bytes() == original


# -- --in-place: atomic, and never overwrites a file the user did not name -----------------------

def test_in_place_never_overwrites_an_existing_backup(capsys, model_file):
    original = model_file.read_bytes()
    precious = model_file.with_name("model.py.bak")
    precious.write_text("the user's own backup\n")
    model_file.with_name("model.py.bak.1").mkdir()  # a name that is taken by a folder is skipped too
    code, out, err = run(capsys, "analyze", model_file, "--emit", "source", "--in-place")
    assert code == 0, err
    backup = model_file.with_name("model.py.bak.2")
    assert err.splitlines() == [f"autoreparam: rewrote {model_file}; the original is kept in {backup}"]
    assert precious.read_text() == "the user's own backup\n"
    assert backup.read_bytes() == original
    assert model_file.read_bytes() != original
    assert files(model_file.parent) == ["model.py", "model.py.bak", "model.py.bak.1", "model.py.bak.2"]


def test_in_place_failure_keeps_the_original_and_leaves_no_backup(capsys, model_file, monkeypatch):
    original = model_file.read_bytes()
    _interrupt_replacing(monkeypatch, model_file.name, OSError(errno.ENOSPC, "No space left on device"))
    code, out, err = run(capsys, "analyze", model_file, "--emit", "source", "--in-place")
    assert code == 2
    one_line(err, "autoreparam: error: ", f"cannot write {model_file}: No space left on device")
    assert model_file.read_bytes() == original
    assert files(model_file.parent) == ["model.py"]


def test_in_place_through_a_symlink_rewrites_its_target(capsys, model_file):
    original = model_file.read_bytes()
    link = model_file.with_name("link.py")
    link.symlink_to(model_file.name)
    code, out, err = run(capsys, "analyze", link, "--emit", "source", "--in-place")
    assert code == 0, err
    assert link.is_symlink()  # the link is kept, not replaced by a copy
    assert model_file.read_bytes() != original
    assert link.with_name("link.py.bak").read_bytes() == original


# -- argparse usage errors: a short usage line and one error line --------------------------------

@pytest.mark.parametrize("argv, usage", [
    ([], "usage: autoreparam {analyze,compare} ..."),
    (["frobnicate", "x.py"], "usage: autoreparam {analyze,compare} ..."),
    (["--bogus"], "usage: autoreparam {analyze,compare} ..."),
    (["analyze"], "usage: autoreparam analyze FILE [options]"),
    (["analyze", "x.py", "--emit", "pdf"], "usage: autoreparam analyze FILE [options]"),
    (["analyze", "x.py", "--bogus"], "usage: autoreparam analyze FILE [options]"),
    (["compare", "x.py", "--steps", "many"], "usage: autoreparam compare FILE [options]"),
    (["compare", "x.py", "--guide", "AutoBogus"], "usage: autoreparam compare FILE [options]"),
])
def test_usage_errors_are_two_lines(capsys, argv, usage):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith(usage + " (see autoreparam"), lines[0]
    assert lines[1].startswith("autoreparam: error: "), lines[1]
