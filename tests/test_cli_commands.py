"""The ``autoreparam`` commands end to end, in-process through ``cli.main`` and in a subprocess.

``analyze`` on every example (text, ``--json``, ``--emit``, ``--graph`` PNG/SVG/DOT,
``--fail-on-invariance``), ``compare`` (table, ``--plot``, ``--guide``, ``--steps``), ``--debug``,
``--version``, ``--help``, and bad input: one error line on stderr, exit 2, nothing written.

Basic ``analyze`` behaviour and its bad-input messages are in test_cli.py, ``--emit`` details in
test_emit_cli.py; this file covers the rest of the command line. Subprocesses are slow (JAX import
and compile), so there is one per example, one ``compare`` and one cheap exit-code check.
"""

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import autoreparam
import autoreparam.compare as compare_module
from autoreparam.cli import EXAMPLES as HELP_EXAMPLES
from autoreparam.cli import main
from autoreparam.emit import MARKER

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = ROOT / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The smallest inputs that still show each example's structure (the tensor model at its default
# size takes ~15 s to analyse).
EXAMPLES = {
    "tensor_model": ["--args", "(3, 2, 4), {'y': simulate(3, 2, 4)}"],
    "eight_schools": [],  # its model_args(): 8 schools
    "county_covariate": ["--args", "model_args(30, 4)"],
}

# What the analysis finds in each example at the inputs above.
EXPECTED = {
    "tensor_model": dict(
        sites=["mu", "sigma_a", "sigma_b", "sigma_C", "step_z", "step_A", "step_B", "sigma",
               "z", "a", "A", "b", "B", "C", "y"],
        terms=["mu", "z", "a", "A", "b", "B", "C"], n_pairs=21,
        some_pairs={("mu", "a"), ("z", "A"), ("b", "B"), ("B", "C")},
        funnels={"a", "b", "C"}, planned={"z", "a", "A", "b", "B", "C"}, y_shape=[3, 2, 4]),
    "eight_schools": dict(
        sites=["mu", "tau", "theta", "y"], terms=["theta"], n_pairs=0, some_pairs=set(),
        funnels={"theta"}, planned={"theta"}, y_shape=[8]),
    "county_covariate": dict(
        sites=["mu", "w", "tau", "a", "sigma", "y"], terms=["mu", "w", "a"], n_pairs=2,
        some_pairs={("mu", "a"), ("w", "a")}, funnels={"a"}, planned={"a"}, y_shape=[30]),
}

TINY = """\
import numpy as np
import numpyro
import numpyro.distributions as dist
import autoreparam

GROUP = np.array([0, 1, 2, 0, 1, 2])


def model(group, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("groups", 3):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", group.shape[0]):
        numpyro.sample("y", dist.Normal(mu + a[group], 0.5), obs=y)
"""

TINY_ARGS = """

def model_args():
    return (GROUP,), {"y": np.zeros(6, dtype=np.float32)}
"""

TINY_RAISES = TINY.replace('mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))',
                           'mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))\n'
                           '    raise RuntimeError("boom in the model")')


def auto_model(name, decorator="@autoreparam.auto"):
    return f"""

{decorator}
def {name}(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    with numpyro.plate("obs", 4):
        numpyro.sample("y", dist.Normal(mu + b, 0.5), obs=y)
"""


# -- helpers -------------------------------------------------------------------------------------

def example(name):
    return str(EXAMPLES_DIR / f"{name}.py")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def files(directory):
    """The directory's entries, ignoring __pycache__ (importing a model may write bytecode)."""
    return sorted(f for f in os.listdir(directory) if f != "__pycache__")


def write(directory, name, text):
    path = Path(directory) / name
    path.write_text(textwrap.dedent(text))
    return path


def assert_one_error_line(err, *fragments):
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("autoreparam: error: "), err
    for f in fragments:
        assert str(f) in lines[0], (f, lines[0])
    return lines[0]


def assert_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 2000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 100 and height > 100
    return width, height


def assert_dot(path, expected):
    text = Path(path).read_text()
    assert text.startswith("digraph ")
    assert text.rstrip().endswith("}")
    assert text.count("{") == text.count("}")
    for site in expected["sites"]:
        assert re.search(rf'^  "{re.escape(site)}" \[label=', text, re.M), site
    invariant = re.findall(r'^  "(\w+)" -> "(\w+)" \[dir=none, style=dashed, color=red', text, re.M)
    assert len(invariant) == expected["n_pairs"]
    assert expected["some_pairs"] <= set(invariant)
    dependencies = re.findall(r'^  "(\w+)" -> "(\w+)";$', text, re.M)
    assert dependencies and all(b != a for a, b in dependencies)
    return text


def assert_report_text(out, expected):
    assert out.startswith("autoreparam analysis of model\n")
    assert f"additive terms of y: {' + '.join(expected['terms'])}" in out
    if expected["n_pairs"]:
        assert f"likelihood-invariant pairs ({expected['n_pairs']}):" in out
        for a, b in expected["some_pairs"]:
            assert f"{{{a}, {b}}}" in out
    else:
        assert "likelihood-invariant pairs: none" in out
    for site in expected["funnels"]:
        assert re.search(rf"^  {site} ~ Normal: scale depends on ", out, re.M), site
    assert "plan for model:" in out


def assert_report_json(data, expected):
    assert {"sites", "terms", "invariances", "funnels", "plan"} <= set(data)
    assert data["model"] == "model"
    assert [s["name"] for s in data["sites"]] == expected["sites"]
    assert next(s for s in data["sites"] if s["name"] == "y")["shape"] == expected["y_shape"]
    assert [t["site"] for t in data["terms"]["y"]] == expected["terms"]
    pairs = {tuple(i["sites"]) for i in data["invariances"] if i["kind"] == "additive"}
    assert len(pairs) == expected["n_pairs"]
    assert expected["some_pairs"] <= pairs
    assert {f["site"] for f in data["funnels"]} == expected["funnels"]
    plan = data["plan"]
    assert plan["model"] == "model"
    assert {s["name"] for s in plan["sites"]} == expected["planned"]
    # the plan in the JSON is the plan itself: it loads back
    assert autoreparam.Plan.from_json(plan).to_json() == plan


# -- analyze on every example, in-process --------------------------------------------------------

@pytest.mark.parametrize("name", EXAMPLES)
def test_analyze_text_and_png_graph(capsys, tmp_path, name):
    graph = tmp_path / "graph.png"
    code, out, err = run(capsys, "analyze", example(name), *EXAMPLES[name], "--graph", graph)
    assert code == 0, err
    assert err == ""
    assert_report_text(out, EXPECTED[name])
    assert out.rstrip().endswith(f"site graph written to {graph}")
    assert_png(graph)
    assert files(tmp_path) == ["graph.png"]  # no temporary file left


@pytest.mark.parametrize("name", EXAMPLES)
def test_analyze_json(capsys, name):
    code, out, err = run(capsys, "analyze", example(name), *EXAMPLES[name], "--json")
    assert code == 0, err
    assert err == ""
    assert_report_json(json.loads(out), EXPECTED[name])  # stdout is one JSON document, nothing else


@pytest.mark.parametrize("name", EXAMPLES)
def test_analyze_dot_graph_and_emitted_source(capsys, tmp_path, name):
    dot, source = tmp_path / "sites.dot", tmp_path / "reparam_model.py"
    code, out, err = run(capsys, "analyze", example(name), *EXAMPLES[name], "--graph", dot,
                         "--emit", "source", "-o", source)
    assert code == 0, err
    assert out == "" and err == ""
    assert_dot(dot, EXPECTED[name])
    text = source.read_text()
    assert text.startswith(MARKER)
    ast.parse(text)
    for site in EXPECTED[name]["planned"]:
        assert f"'{site}'" in text or f'"{site}"' in text
    assert files(tmp_path) == ["reparam_model.py", "sites.dot"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_analyze_emit_config_to_stdout(capsys, name):
    code, out, err = run(capsys, "analyze", example(name), *EXAMPLES[name], "--emit", "config")
    assert code == 0, err
    assert err == ""
    tree = ast.parse(out)
    assert "make_config" in {f.name for f in tree.body if isinstance(f, ast.FunctionDef)}
    assert "Plan.from_json" in out


def test_analyze_svg_graph(capsys, tmp_path):
    graph = tmp_path / "graph.svg"
    code, out, err = run(capsys, "analyze", example("eight_schools"), "--graph", graph)
    assert code == 0, err
    text = graph.read_text()
    assert "<svg" in text and "</svg>" in text
    assert files(tmp_path) == ["graph.svg"]


def test_dot_graph_of_a_model_without_invariances(capsys, tmp_path):
    dot = tmp_path / "g.dot"
    code, out, err = run(capsys, "analyze", example("eight_schools"), "--graph", dot)
    assert code == 0, err
    text = assert_dot(dot, EXPECTED["eight_schools"])
    assert "dashed" not in text
    assert '"tau" -> "theta";' in text and '"theta" -> "y";' in text
    assert '"y" [label="y\\n[school]", style=filled' in text  # observed site, with its plate


# -- --fail-on-invariance ------------------------------------------------------------------------

@pytest.mark.parametrize("name, extra, code_expected", [
    ("tensor_model", [], 1),
    ("eight_schools", [], 0),
    ("county_covariate", ["--json"], 1),
])
def test_fail_on_invariance(capsys, name, extra, code_expected):
    code, out, err = run(capsys, "analyze", example(name), *EXAMPLES[name], *extra, "--fail-on-invariance")
    assert code == code_expected, err
    if "--json" in extra:
        assert_report_json(json.loads(out), EXPECTED[name])  # stdout stays pure JSON
    else:
        assert_report_text(out, EXPECTED[name])  # the report is still printed
    if code_expected:
        n = EXPECTED[name]["n_pairs"]
        assert err.splitlines() == [f"autoreparam: {example(name)}: {n} likelihood-invariant pair(s) "
                                    "(--fail-on-invariance)"]
    else:
        assert err == ""


# -- choosing the model --------------------------------------------------------------------------

@pytest.mark.parametrize("decorator", ["@autoreparam.auto", "@autoreparam.auto(init='zero')"])
def test_single_auto_function_is_preferred_to_model(capsys, tmp_path, decorator):
    path = write(tmp_path, "m.py", TINY + TINY_ARGS + auto_model("fitted", decorator))
    code, out, err = run(capsys, "analyze", path, "--args", "(), {'y': np.zeros(4)}", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["model"] == "fitted"  # the wrapped model is analysed, not the wrapper
    assert [i["sites"] for i in data["invariances"]] == [["mu", "b"]]


def test_auto_function_imported_from_elsewhere_is_not_a_candidate(capsys, tmp_path):
    write(tmp_path, "shared_models_for_cli.py", TINY + auto_model("imported"))
    path = write(tmp_path, "m.py", TINY + TINY_ARGS.replace("\ndef model_args", "\n"
                 "from shared_models_for_cli import imported\n\n\ndef model_args"))
    code, out, err = run(capsys, "analyze", path, "--json")
    assert code == 0, err
    assert json.loads(out)["model"] == "model"


def test_two_auto_functions_need_model_option(capsys, tmp_path):
    path = write(tmp_path, "m.py", TINY + auto_model("first") + auto_model("second"))
    code, out, err = run(capsys, "analyze", path)
    assert code == 2 and out == ""
    assert_one_error_line(err, path, "@autoreparam.auto", "first", "second", "--model NAME")
    code, out, err = run(capsys, "analyze", path, "--model", "second", "--args", "(), {'y': np.zeros(4)}",
                         "--json")
    assert code == 0, err
    assert json.loads(out)["model"] == "second"


# -- where the inputs came from, when the model fails on them -----------------------------------

@pytest.mark.parametrize("command", ["analyze", "compare"])
@pytest.mark.parametrize("source", ["args", "model_args", "none"])
def test_model_failure_names_where_the_inputs_came_from(capsys, tmp_path, command, source):
    if source == "args":
        path = write(tmp_path, "m.py", TINY_RAISES + TINY_ARGS)
        argv = ["--args", "(GROUP,)"]
        fragments = ["RuntimeError", "boom in the model", "[called with the inputs from --args '(GROUP,)']"]
    elif source == "model_args":
        path = write(tmp_path, "m.py", TINY_RAISES + TINY_ARGS)
        argv = []
        fragments = ["RuntimeError", "boom in the model", f"[called with the inputs from model_args() in {path}]"]
    else:
        path = write(tmp_path, "m.py", TINY)  # model(group, y=None), no model_args(), no --args
        argv = []
        fragments = ["TypeError", "'group'", "[called with no arguments", "pass --args EXPR",
                     "define model_args()"]
    code, out, err = run(capsys, command, path, *argv)
    assert code == 2
    assert out == ""
    assert_one_error_line(err, path, *fragments)


@pytest.mark.parametrize("expr, says", [
    ("(3, 2)", "missing 1 required positional argument: 'T'"),
    ("(3, 2, 4, None, 5)", "positional arguments but 5 were given"),
])
def test_args_of_the_wrong_arity(capsys, expr, says):
    code, out, err = run(capsys, "analyze", example("tensor_model"), "--args", expr)
    assert code == 2 and out == ""
    assert_one_error_line(err, example("tensor_model"), "TypeError", says, f"--args {expr!r}")


# -- bad input, both commands: one line, exit 2, nothing written ---------------------------------

BAD = {
    # case: (file contents or None for a missing file, extra argv, fragments of the error line)
    "missing_file": (None, [], ["no such file"]),
    "syntax_error": ("import numpyro\n\n\ndef model(:\n    pass\n", [], [":4: syntax error"]),
    "import_raises": (TINY + "\nraise RuntimeError('data file not found')\n", [],
                      ["importing it raised RuntimeError: data file not found"]),
    "no_model": (TINY.replace("def model(", "def hierarchical(") + "\n\ndef pooled(y=None):\n    pass\n", [],
                 ["no @autoreparam.auto function and no function named 'model'", "--model NAME",
                  "hierarchical, pooled"]),
    "two_auto": (TINY + auto_model("first") + auto_model("second"), [],
                 ["several functions are decorated with @autoreparam.auto (first, second)"]),
    "args_do_not_evaluate": (TINY + TINY_ARGS, ["--args", "(GROUPS,)"], ["--args '(GROUPS,)'", "NameError"]),
    "args_syntax_error": (TINY + TINY_ARGS, ["--args", "(GROUP,"], ["--args '(GROUP,'", "SyntaxError"]),
    "args_wrong_arity": (TINY + TINY_ARGS, ["--args", "(GROUP, None, 1)"],
                         ["TypeError", "3 were given", "[called with the inputs from --args"]),
    "model_fails": (TINY_RAISES + TINY_ARGS, [], ["boom in the model", "model_args()"]),
    "model_args_raises": (TINY + TINY_ARGS.replace("return (GROUP,)", "raise OSError('no data'); return (GROUP,)"),
                          [], ["model_args() raised OSError: no data"]),
}


@pytest.mark.parametrize("command", ["analyze", "compare"])
@pytest.mark.parametrize("case", BAD)
def test_bad_input(capsys, tmp_path, command, case):
    contents, extra, fragments = BAD[case]
    path = tmp_path / "m.py"
    if contents is not None:
        path.write_text(contents)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = files(tmp_path)
    if command == "analyze":
        outputs = ["--graph", out_dir / "g.png", "--emit", "config", "-o", out_dir / "cfg.py"]
    else:
        outputs = ["--plot", out_dir / "p.png", "--steps", "5", "--no-progress"]
    code, out, err = run(capsys, command, path, *extra, *outputs)
    assert code == 2
    assert out == ""
    assert_one_error_line(err, path, *fragments)
    assert files(out_dir) == []
    assert files(tmp_path) == before


@pytest.mark.parametrize("option, name", [("--graph", "g.png"), ("--graph", "g.dot"), ("-o", "cfg.py")])
@pytest.mark.parametrize("where", ["missing_dir", "under_a_file", "is_a_dir"])
def test_unwritable_analyze_output(capsys, tmp_path, option, name, where):
    target = unwritable(tmp_path, name, where)
    before = files(tmp_path)
    argv = [option, target] + (["--emit", "config"] if option == "-o" else [])
    code, out, err = run(capsys, "analyze", example("eight_schools"), *argv)
    assert code == 2
    assert out == ""
    assert_one_error_line(err, "cannot write", target)
    assert files(tmp_path) == before  # nothing written, no temporary file left
    if where == "is_a_dir":
        assert files(target) == []


def unwritable(tmp_path, name, where):
    if where == "missing_dir":
        return tmp_path / "no" / "such" / name
    if where == "under_a_file":
        (tmp_path / "afile").write_text("x")
        return tmp_path / "afile" / name
    target = tmp_path / name
    target.mkdir()
    return target


def test_bad_graph_suffix_and_graph_with_json(capsys, tmp_path):
    code, out, err = run(capsys, "analyze", example("eight_schools"), "--graph", tmp_path / "g.txt")
    assert code == 2 and out == ""
    assert_one_error_line(err, "g.txt", ".png, .svg or .dot")
    code, out, err = run(capsys, "analyze", example("eight_schools"), "--graph", tmp_path / "g.png", "--json")
    assert code == 2 and out == ""
    assert_one_error_line(err, "--graph", "--json")
    assert files(tmp_path) == []


@pytest.mark.parametrize("argv", [["analyze"], ["frobnicate", "x.py"], ["compare", "x.py", "--steps", "many"],
                                  ["compare", "x.py", "--guide", "AutoBogus"], ["analyze", "x.py", "--emit", "pdf"]])
def test_usage_errors_exit_2(capsys, argv):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "error:" in err.splitlines()[-1]


# -- --debug, --version, --help ------------------------------------------------------------------

def test_debug_prints_the_traceback_then_the_error_line(capsys, tmp_path):
    path = write(tmp_path, "m.py", TINY_RAISES + TINY_ARGS)
    code, out, err = run(capsys, "analyze", path)
    assert code == 2
    line = assert_one_error_line(err, "boom in the model")
    code, out, err = run(capsys, "analyze", path, "--debug")
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert lines[-1] == line  # the same error line, last
    assert "Traceback (most recent call last):" in err
    assert "RuntimeError: boom in the model" in err  # the original exception, in the chain
    assert str(path) in err and 'raise RuntimeError("boom in the model")' in err  # the user's frame


def test_debug_on_a_bad_file_with_compare(capsys, tmp_path):
    path = tmp_path / "missing.py"
    code, out, err = run(capsys, "compare", path, "--debug")
    assert code == 2 and out == ""
    assert "Traceback (most recent call last):" in err
    assert err.splitlines()[-1].startswith(f"autoreparam: error: {path}: no such file")


def test_version(capsys):
    assert main(["--version"]) == 0
    out, err = capsys.readouterr()
    assert out == f"autoreparam {autoreparam.__version__}\n"
    assert autoreparam.__version__ == importlib.metadata.version("autoreparam")


@pytest.mark.parametrize("command", [None, "analyze", "compare"])
def test_help_has_an_example(capsys, command):
    assert main(([command] if command else []) + ["--help"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "example:" in out
    wanted = HELP_EXAMPLES.values() if command is None else [HELP_EXAMPLES[command]]
    flat = " ".join(out.split())  # a subcommand's epilog may be re-wrapped to the terminal width
    for ex in wanted:
        assert ex in flat
        # the example names a real file and the command it documents
        words = ex.split()
        assert words[:3] == ["example:", "autoreparam", command or words[2]]
        assert (ROOT / words[3]).is_file()
    if command:
        for option in {"analyze": ["--json", "--emit", "--graph", "--fail-on-invariance", "--args", "--model"],
                       "compare": ["--steps", "--guide", "--plot", "--args", "--model"]}[command]:
            assert option in out


# -- compare -------------------------------------------------------------------------------------

@pytest.fixture
def fake_fit(monkeypatch):
    """Replace SVI in compare with a quick stand-in that records how it was called."""
    calls = []

    def fit(label, model, guide_name, args, kwargs, steps, lr, seed, progress, sites):
        calls.append(dict(label=label, model=model, guide=guide_name, args=args, kwargs=kwargs, steps=steps,
                          lr=lr, seed=seed, progress=progress, sites=list(sites)))
        scale = 1.0 if label == "original" else 2.0
        return compare_module.FitSummary(label, -40.0 + scale, 0.05 * scale, 0.5 * scale,
                                         np.linspace(60.0, 40.0 - scale, steps),
                                         {n: (0.1 * i, scale * (i + 1)) for i, n in enumerate(sites)})

    monkeypatch.setattr(compare_module, "_fit", fit)
    return calls


def test_compare_fits_both_models_alike(capsys, tmp_path, fake_fit):
    plot = tmp_path / "cmp.png"
    code, out, err = run(capsys, "compare", example("eight_schools"), "--steps", "7",
                         "--guide", "AutoLowRankMultivariateNormal", "--plot", plot)
    assert code == 0, err
    assert [c["label"] for c in fake_fit] == ["original", "reparameterized"]
    first, second = fake_fit
    for key in ("guide", "steps", "lr", "seed", "sites", "progress"):
        assert first[key] == second[key], key
    assert first["guide"] == "AutoLowRankMultivariateNormal" and first["steps"] == 7
    assert first["progress"] is True  # a progress bar unless --no-progress
    assert first["sites"] == ["mu", "tau", "theta"]
    assert first["model"].__name__ == "model" and not hasattr(first["model"], "plan_for")
    assert hasattr(second["model"], "plan_for")  # autoreparam.reparameterize(model)
    np.testing.assert_array_equal(first["args"][0], second["args"][0])
    assert "SVI with AutoLowRankMultivariateNormal, Adam, 7 steps, same seed for both:" in out
    assert out.rstrip().endswith(f"plot written to {plot}")
    width, height = assert_png(plot)
    assert width > 2 * height  # the ELBO curves and the sds side by side
    assert files(tmp_path) == ["cmp.png"]


def test_compare_table_columns_line_up_with_long_site_names(capsys, fake_fit):
    code, out, err = run(capsys, "compare", example("radon_mn"), "--steps", "3", "--no-progress")
    assert code == 0, err
    table = out.split("elements):\n", 1)[1].split("\n\n", 1)[0].splitlines()  # up to the warnings
    assert table[0].split()[0] == "site" and len(table) == 1 + len(fake_fit[0]["sites"])
    ends = {len(line) for line in table}  # right-aligned columns: every row ends at the same column
    assert len(ends) == 1, table
    assert any(line.startswith("county_effect_scale ") for line in table)


def test_compare_no_progress(capsys, fake_fit):
    code, out, err = run(capsys, "compare", example("eight_schools"), "--steps", "3", "--no-progress")
    assert code == 0, err
    assert [c["progress"] for c in fake_fit] == [False, False]


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_compare_steps_must_be_positive(capsys, fake_fit, steps):
    code, out, err = run(capsys, "compare", example("eight_schools"), "--steps", steps)
    assert code == 2 and out == ""
    assert_one_error_line(err, "--steps", steps)
    assert fake_fit == []


def test_compare_plot_suffix_is_checked_before_fitting(capsys, tmp_path, fake_fit):
    code, out, err = run(capsys, "compare", example("eight_schools"), "--plot", tmp_path / "cmp.pdf")
    assert code == 2 and out == ""
    assert_one_error_line(err, "cmp.pdf", ".png or .svg")
    assert fake_fit == []
    assert files(tmp_path) == []


@pytest.mark.parametrize("where", ["missing_dir", "under_a_file", "is_a_dir"])
def test_compare_unwritable_plot(capsys, tmp_path, fake_fit, where):
    target = unwritable(tmp_path, "cmp.png", where)
    before = files(tmp_path)
    code, out, err = run(capsys, "compare", example("eight_schools"), "--steps", "3", "--plot", target)
    assert code == 2
    assert_one_error_line(err, "cannot write", target)
    assert files(tmp_path) == before
    if where == "is_a_dir":
        assert files(target) == []


def parse_table(out):
    """The numbers of a compare table: {label: (elbo, se, seconds)}, {site: (m0, m1, s0, s1, ratio)}."""
    fits = {m.group(1): tuple(map(float, m.group(2, 3, 4))) for m in re.finditer(
        r"^(original|reparameterized)\s+(-?\d+\.\d\d) \+- (\d+\.\d\d)\s+(\d+\.\d)  (flat|RISING)$", out, re.M)}
    lines = out.splitlines()
    header = next(i for i, l in enumerate(lines) if l.split()[:1] == ["site"])
    assert lines[header].split() == ["site", "mean", "orig", "mean", "reparam", "sd", "orig", "sd", "reparam",
                                     "sd", "ratio"]
    sites = {}
    for l in lines[header + 1:]:
        if not l.strip():
            break
        name, *numbers = l.split()
        sites[name] = tuple(map(float, numbers))
    return fits, sites


def test_compare_runs_svi_on_a_small_model(capsys):
    code, out, err = run(capsys, "compare", example("eight_schools"), "--steps", "200",
                         "--guide", "AutoDiagonalNormal", "--no-progress")
    assert code == 0, err
    assert err == ""
    assert out.startswith("SVI with AutoDiagonalNormal, Adam, 200 steps, same seed for both:")
    fits, sites = parse_table(out)
    assert set(fits) == {"original", "reparameterized"}
    for elbo, se, seconds in fits.values():
        assert -60 < elbo < -20  # eight schools: about -37 at 200 steps
        assert 0 < se < 1  # many particles: a small standard error
        assert seconds > 0
    assert set(sites) == {"mu", "tau", "theta"}
    for m0, m1, s0, s1, ratio in sites.values():
        assert s0 > 0 and s1 > 0
        assert ratio == pytest.approx(s1 / s0, abs=0.02, rel=0.02)
    # non-centring theta lets the guide see the wide posterior the centred guide collapses
    assert sites["tau"][3] > sites["tau"][2]


# -- through a subprocess: one run per example, one compare --------------------------------------

def console_script():
    script = Path(sys.executable).with_name("autoreparam")
    if script.exists():
        return str(script)
    found = shutil.which("autoreparam")
    if found is None:
        pytest.skip("the autoreparam console script is not installed")
    return found


def cli(*argv, cwd, script=False):
    command = [console_script()] if script else [sys.executable, "-m", "autoreparam.cli"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(command + [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_subprocess_tensor_model_json_and_fail_on_invariance(tmp_path):
    name = "tensor_model"
    proc = cli("analyze", example(name), *EXAMPLES[name], "--json", "--fail-on-invariance", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert_report_json(json.loads(proc.stdout), EXPECTED[name])  # nothing but JSON on stdout
    assert proc.stderr.splitlines()[-1].endswith("21 likelihood-invariant pair(s) (--fail-on-invariance)")
    assert "Traceback" not in proc.stderr
    assert files(tmp_path) == []


def test_subprocess_eight_schools_text_and_png_graph(tmp_path):
    name = "eight_schools"
    proc = cli("analyze", example(name), "--graph", "graph.png", cwd=tmp_path, script=True)
    assert proc.returncode == 0, proc.stderr
    assert_report_text(proc.stdout, EXPECTED[name])
    assert "site graph written to graph.png" in proc.stdout
    assert_png(tmp_path / "graph.png")
    assert files(tmp_path) == ["graph.png"]


def test_subprocess_county_covariate_emit_and_dot_graph(tmp_path):
    name = "county_covariate"
    proc = cli("analyze", example(name), *EXAMPLES[name], "--emit", "source", "-o", "reparam.py",
               "--graph", "sites.dot", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert_dot(tmp_path / "sites.dot", EXPECTED[name])
    text = (tmp_path / "reparam.py").read_text()
    assert text.startswith(MARKER)
    ast.parse(text)
    assert files(tmp_path) == ["reparam.py", "sites.dot"]


def test_subprocess_compare_with_plot(tmp_path):
    proc = cli("compare", example("eight_schools"), "--steps", "200", "--plot", "cmp.png", cwd=tmp_path, script=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("SVI with AutoNormal, Adam, 200 steps, same seed for both:")
    fits, sites = parse_table(proc.stdout)
    assert set(fits) == {"original", "reparameterized"} and set(sites) == {"mu", "tau", "theta"}
    assert "plot written to cmp.png" in proc.stdout
    assert proc.stderr.count("200/200") == 2  # a progress bar for each fit
    assert "Traceback" not in proc.stderr
    assert_png(tmp_path / "cmp.png")
    assert files(tmp_path) == ["cmp.png"]


def test_subprocess_bad_input_exit_code_and_one_line(tmp_path):
    proc = cli("analyze", "missing.py", "--graph", "g.png", cwd=tmp_path, script=True)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == ["autoreparam: error: missing.py: no such file (expected a Python file "
                                        "defining a NumPyro model)"]
    assert files(tmp_path) == []


# -- regressions: bugs found by these tests and fixed ------------------------------------

def test_compare_discrete_latent_is_one_error_line(capsys, tmp_path):
    path = write(tmp_path, "m.py", TINY + """

def discrete(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    numpyro.sample("k", dist.Bernoulli(0.5))
    with numpyro.plate("n", 3):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)
""")
    code, out, err = run(capsys, "compare", path, "--model", "discrete", "--args", "(), {'y': np.zeros(3)}",
                         "--steps", "5", "--no-progress")
    assert code == 2
    assert_one_error_line(err, "'k'")


def test_nothing_written_when_emit_fails_after_graph(capsys, tmp_path):
    code, out, err = run(capsys, "analyze", example("eight_schools"), "--graph", tmp_path / "g.dot",
                         "--emit", "config", "-o", tmp_path / "missing" / "cfg.py")
    assert code == 2
    assert_one_error_line(err, "cannot write")
    assert files(tmp_path) == []


def test_compare_unwritable_plot_fails_before_fitting(capsys, tmp_path, fake_fit):
    code, out, err = run(capsys, "compare", example("eight_schools"), "--plot", tmp_path / "no" / "cmp.png")
    assert code == 2
    assert out == ""
    assert fake_fit == []


def test_outputs_respect_the_umask(capsys, tmp_path):
    old = os.umask(0o022)
    try:
        code, out, err = run(capsys, "analyze", example("eight_schools"), "--graph", tmp_path / "g.dot",
                             "--emit", "config", "-o", tmp_path / "cfg.py")
    finally:
        os.umask(old)
    assert code == 0, err
    assert oct((tmp_path / "g.dot").stat().st_mode & 0o777) == oct(0o644)
    assert oct((tmp_path / "cfg.py").stat().st_mode & 0o777) == oct(0o644)


def test_in_place_keeps_the_file_mode(capsys, tmp_path):
    path = tmp_path / "m.py"
    shutil.copyfile(example("eight_schools"), path)
    path.chmod(0o755)
    code, out, err = run(capsys, "analyze", path, "--emit", "source", "--in-place")
    assert code == 0, err
    assert MARKER in path.read_text()
    assert oct(path.stat().st_mode & 0o777) == oct(0o755)


def test_output_without_emit_is_a_usage_error(capsys, tmp_path):
    code, out, err = run(capsys, "analyze", example("eight_schools"), "-o", tmp_path / "report.txt")
    assert code == 2
    assert_one_error_line(err, "-o", "--emit")


def test_json_with_emit_is_json_or_refused(capsys):
    code, out, err = run(capsys, "analyze", example("eight_schools"), "--json", "--emit", "config")
    if code == 2:
        assert out == ""
        assert_one_error_line(err, "--json", "--emit")
    else:
        json.loads(out)


def test_debug_traceback_for_an_unwritable_graph(capsys, tmp_path):
    code, out, err = run(capsys, "analyze", example("eight_schools"), "--graph", tmp_path / "no" / "g.dot",
                         "--debug")
    assert code == 2
    assert "Traceback (most recent call last):" in err
    assert err.splitlines()[-1].startswith("autoreparam: error:") and "cannot write" in err.splitlines()[-1]


def test_debug_traceback_for_an_unwritable_emit_output(capsys, tmp_path):
    code, out, err = run(capsys, "analyze", example("eight_schools"), "--emit", "config",
                         "-o", tmp_path / "no" / "cfg.py", "--debug")
    assert code == 2
    assert "Traceback (most recent call last):" in err


def test_module_that_exits_on_import(capsys, tmp_path):
    path = write(tmp_path, "m.py", TINY + "\nimport sys\nsys.exit(3)\n")
    code, out, err = run(capsys, "analyze", path)
    assert code == 2
    assert_one_error_line(err, path, "SystemExit")
