"""``autoreparam analyze FILE --emit source|config [-o OUT] [--in-place]``, in-process via ``cli.main``."""

import ast
import os
import shutil

import jax
import numpy as np
import numpyro
import numpyro.primitives
import pytest
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from numpyro.infer.util import log_density

import autoreparam
from autoreparam.cli import load_module, main
from autoreparam.emit import MARKER
from emit_support import case_path, load, plan_for, read, trace


@pytest.fixture
def model_file(tmp_path):
    """A copy of the crossed-effects case (fast to analyse) in an otherwise empty directory."""
    path = tmp_path / "model.py"
    shutil.copyfile(case_path("crossed"), path)
    return path


def files(directory):
    """The directory's entries, ignoring __pycache__ (importing the model may write bytecode)."""
    return sorted(f for f in os.listdir(directory) if f != "__pycache__")


def run(capsys, *argv):
    code = main(["analyze", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def expected_source():
    """What emit_source gives for the crossed case (plans are deterministic, see test_emit.py)."""
    return autoreparam.emit_source(read(case_path("crossed")), "model", plan_for(case_path("crossed"))).source


def assert_one_error_line(err, *names):
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("autoreparam: error: "), err
    for n in names:
        assert n in lines[0], lines[0]


def test_emit_source_to_stdout(capsys, model_file):
    code, out, err = run(capsys, model_file, "--emit", "source")
    assert code == 0, err
    assert err == ""
    ast.parse(out)
    assert out.startswith(MARKER)
    assert out == expected_source()
    assert files(model_file.parent) == ["model.py"]


def test_emit_source_to_file(capsys, model_file, tmp_path):
    out_path = tmp_path / "out" / "reparam_model.py"
    out_path.parent.mkdir()
    code, out, err = run(capsys, model_file, "--emit", "source", "-o", out_path)
    assert code == 0, err
    assert out == "" and err == ""
    text = read(out_path)
    ast.parse(text)
    assert MARKER in text
    assert text == expected_source()
    assert files(out_path.parent) == ["reparam_model.py"]  # no temporary file left
    assert read(model_file) == read(case_path("crossed"))


def test_emit_source_warnings_go_to_stderr(capsys, tmp_path):
    path = tmp_path / "loop_model.py"
    shutil.copyfile(case_path("warn_loop"), path)
    source = read(path)
    line_a = source.splitlines().index('            a = numpyro.sample("a", dist.Normal(0.0, sigma_a))') + 1
    line_b = source.splitlines().index('        b = numpyro.sample("b", dist.Normal(0.0, sigma_b))') + 1
    code, out, err = run(capsys, path, "--emit", "source", "-o", tmp_path / "out.py")
    assert code == 0, err
    assert out == ""
    assert err.splitlines() == [
        f"autoreparam: warning: {path}: line {line_a}: site 'a' is inside a loop or comprehension; left unchanged",
        f"autoreparam: warning: {path}: line {line_b}: site 'b' has offset parent 'a', whose value is not bound "
        "to a simple name earlier in 'model'; left unchanged",
    ]
    # nothing could be rewritten ('b' depends on 'a'): the output is the input, byte for byte
    assert (tmp_path / "out.py").read_bytes() == path.read_bytes()


def test_emit_config_module_builds_a_working_config(capsys, model_file, tmp_path):
    cfg_path = tmp_path / "reparam_config.py"
    code, out, err = run(capsys, model_file, "--emit", "config", "-o", cfg_path)
    assert code == 0, err
    assert out == "" and err == ""
    cfg = load_module(str(cfg_path))
    plan = plan_for(case_path("crossed"))
    assert cfg.PLAN.to_json() == plan.to_json()

    module, args, kwargs = load(case_path("crossed"))
    config = cfg.make_config()
    rmodel = cfg.reparameterize(module.model)
    tr = trace(rmodel, args, kwargs)
    assert {"a_base", "b_base", "a_offset_mu", "b_offset_a"} <= set(tr)
    assert tr["a"]["type"] == "deterministic" and tr["b"]["type"] == "deterministic"
    values = {n: s["value"] for n, s in tr.items() if s["type"] in ("sample", "param") and not s.get("is_observed")}
    assert np.isfinite(float(log_density(rmodel, args, kwargs, values)[0]))
    svi = SVI(rmodel, AutoNormal(rmodel), numpyro.optim.Adam(1e-2), Trace_ELBO())
    losses = svi.run(jax.random.PRNGKey(0), 10, *args, progress_bar=False, **kwargs).losses
    assert np.all(np.isfinite(np.asarray(losses)))
    # learn=False: no params, the analytic xi
    frozen = cfg.make_config(learn=False)
    tr = trace(cfg.reparameterize(module.model, learn=False), args, kwargs)
    assert not [n for n, s in tr.items() if s["type"] == "param"]


def test_emit_config_to_stdout(capsys, model_file):
    code, out, err = run(capsys, model_file, "--emit", "config")
    assert code == 0, err
    ast.parse(out)
    assert "def make_config(" in out and "Plan.from_json" in out


def test_in_place_keeps_a_backup(capsys, model_file):
    original = model_file.read_bytes()
    code, out, err = run(capsys, model_file, "--emit", "source", "--in-place")
    assert code == 0, err
    backup = model_file.with_name("model.py.bak")
    assert out == ""
    assert err.splitlines() == [f"autoreparam: rewrote {model_file}; the original is kept in {backup}"]
    assert backup.read_bytes() == original
    assert read(model_file) == expected_source()
    assert files(model_file.parent) == ["model.py", "model.py.bak"]


def test_in_place_twice_is_a_no_op(capsys, model_file):
    original = model_file.read_bytes()
    assert run(capsys, model_file, "--emit", "source", "--in-place")[0] == 0
    emitted = model_file.read_bytes()
    code, out, err = run(capsys, model_file, "--emit", "source", "--in-place")
    assert code == 0, err
    assert out == ""
    assert model_file.read_bytes() == emitted
    assert err.splitlines() == [f"autoreparam: warning: {model_file}: already reparameterized by autoreparam; "
                                "nothing to do"]
    # the backup still holds the original model (the no-op does not overwrite it with the emitted one)
    assert model_file.with_name("model.py.bak").read_bytes() == original
    assert files(model_file.parent) == ["model.py", "model.py.bak"]


def _no_analysis(monkeypatch):
    """Make any analysis fail the test: re-emitting must stop at the marker, before analysing."""
    import autoreparam.api

    def analyze(*args, **kwargs):
        raise AssertionError("the model was analysed")

    monkeypatch.setattr(autoreparam.api, "analyze", analyze)


def test_cli_emit_of_an_emitted_file_is_a_no_op(capsys, model_file, tmp_path, monkeypatch):
    first, second = tmp_path / "first.py", tmp_path / "second.py"
    assert run(capsys, model_file, "--emit", "source", "-o", first)[0] == 0
    _no_analysis(monkeypatch)
    code, out, err = run(capsys, first, "--emit", "source", "-o", second)
    assert code == 0, err
    assert out == ""
    assert second.read_bytes() == first.read_bytes()
    assert err.splitlines() == [f"autoreparam: warning: {first}: already reparameterized by autoreparam; "
                                "nothing to do"]


def test_cli_emit_of_an_emitted_file_to_stdout_echoes_it(capsys, tmp_path, monkeypatch):
    first = tmp_path / "first.py"
    first.write_bytes(expected_source().replace("\n", "\r\n").encode())  # the echo keeps CRLF too
    before = files(tmp_path)
    _no_analysis(monkeypatch)
    code, out, err = run(capsys, first, "--emit", "source")
    assert code == 0, err
    assert out == read(first)
    assert err.splitlines() == [f"autoreparam: warning: {first}: already reparameterized by autoreparam; "
                                "nothing to do"]
    assert files(tmp_path) == before


@pytest.mark.parametrize("spelling", ["same", "dotted"])
def test_output_equal_to_input_is_refused(capsys, model_file, spelling):
    original = model_file.read_bytes()
    mtime = os.stat(model_file).st_mtime_ns
    target = model_file if spelling == "same" else model_file.parent / "." / ".." / model_file.parent.name / "model.py"
    code, out, err = run(capsys, model_file, "--emit", "source", "-o", target)
    assert code == 2
    assert out == ""
    assert_one_error_line(err, "--in-place")
    assert model_file.read_bytes() == original
    assert os.stat(model_file).st_mtime_ns == mtime
    assert files(model_file.parent) == ["model.py"]


def test_in_place_with_o_or_config_is_refused(capsys, model_file, tmp_path):
    original = model_file.read_bytes()
    code, out, err = run(capsys, model_file, "--emit", "source", "--in-place", "-o", tmp_path / "x.py")
    assert code == 2 and out == ""
    assert_one_error_line(err, "--in-place")
    code, out, err = run(capsys, model_file, "--emit", "config", "--in-place")
    assert code == 2 and out == ""
    assert_one_error_line(err, "--in-place")
    assert model_file.read_bytes() == original
    assert files(model_file.parent) == ["model.py"]


@pytest.mark.parametrize("where", ["missing_dir", "is_a_dir", "under_a_file"])
def test_unwritable_output(capsys, model_file, tmp_path, where, monkeypatch):
    """An unwritable -o is refused before the model is analysed, naming the -o path."""
    if where == "missing_dir":
        target = tmp_path / "no" / "such" / "out.py"
    elif where == "is_a_dir":
        target = tmp_path / "adir"
        target.mkdir()
    else:
        (tmp_path / "afile").write_text("x")
        target = tmp_path / "afile" / "out.py"
    before = files(tmp_path)
    _no_analysis(monkeypatch)
    code, out, err = run(capsys, model_file, "--emit", "source", "-o", target)
    assert code == 2
    assert out == ""
    assert_one_error_line(err, f"-o {target}: cannot write there: ")  # the -o path, not a temporary file
    assert files(tmp_path) == before  # no partial or temporary file anywhere
    if where == "is_a_dir":
        assert files(target) == []
    if where == "under_a_file":
        assert (tmp_path / "afile").read_text() == "x"
    assert model_file.read_bytes() == read(case_path("crossed")).encode()


@pytest.mark.parametrize("where", ["missing_dir", "is_a_dir"])
def test_write_atomic_errors_name_the_target(tmp_path, where):
    """write_atomic's OSError names the path it was asked to write, not its hidden temporary file."""
    from autoreparam.files import write_atomic

    if where == "missing_dir":
        target = tmp_path / "missing" / "out.py"
    else:
        target = tmp_path / "adir"
        target.mkdir()
    with pytest.raises(OSError) as info:
        write_atomic(target, "x = 1\n")
    assert info.value.filename == str(target)
    assert info.value.strerror
    assert files(tmp_path) == (["adir"] if where == "is_a_dir" else [])  # no temporary file left
