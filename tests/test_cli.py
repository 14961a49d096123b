"""The ``autoreparam analyze`` command line, called in-process through ``autoreparam.cli.main``."""

import json
import os
import sys
import textwrap

import pytest

from autoreparam.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "tensor_model.py")

HEADER = """\
import numpy as np
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
"""

GOOD = HEADER + """
GROUP = np.array([0, 1, 2, 0, 1, 2])


def model(group, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("groups", 3):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", group.shape[0]):
        numpyro.sample("y", dist.Normal(mu + a[group], 0.5), obs=y)


def other(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", 4):
        numpyro.sample("y", dist.Normal(mu + b, 0.5), obs=y)


def model_args():
    return (GROUP,), {"y": np.zeros(6, dtype=np.float32)}
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def run(capsys, *argv):
    code = main(["analyze", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_error(capsys, code_expected, argv, *names):
    """The command fails with one line on stderr naming ``names``; nothing on stdout."""
    code, out, err = run(capsys, *argv)
    assert code == code_expected, err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("autoreparam: error: ")
    for n in names:
        assert n in lines[0], lines[0]
    return lines[0]


# -- successful runs ---------------------------------------------------------------------------

def test_example_text_report(capsys):
    code, out, err = run(capsys, EXAMPLE)
    assert code == 0, err
    assert err == ""
    assert "autoreparam analysis of model" in out
    assert "additive terms of y: mu + z + a + A + b + B + C" in out
    assert "likelihood-invariant pairs (21):" in out
    for pair in ("{mu, a}", "{mu, z}", "{a, A}", "{b, B}", "{B, C}"):
        assert pair in out
    assert "a ~ Normal: scale depends on sigma_a" in out


def test_example_json(capsys):
    code, out, err = run(capsys, EXAMPLE, "--json", "--args", "(3, 2, 4), {'y': simulate(3, 2, 4)}")
    assert code == 0, err
    data = json.loads(out)  # stdout is exactly one JSON document
    assert {"sites", "invariances", "funnels", "terms"} <= set(data)
    assert [s["name"] for s in data["sites"]][:2] == ["mu", "sigma_a"]
    assert next(s for s in data["sites"] if s["name"] == "y")["shape"] == [3, 2, 4]
    pairs = {tuple(i["sites"]) for i in data["invariances"] if i["kind"] == "additive"}
    assert ("mu", "a") in pairs and len(pairs) == 21
    assert [t["site"] for t in data["terms"]["y"]] == ["mu", "z", "a", "A", "b", "B", "C"]
    assert {f["site"] for f in data["funnels"]} == {"a", "b", "C"}


def test_model_args_from_module(tmp_path, capsys):
    path = write(tmp_path, "good.py", GOOD)
    code, out, err = run(capsys, path)
    assert code == 0, err
    assert "{mu, a}" in out
    assert "observed Normal (6)" in out


def test_json_only_on_stdout(tmp_path, capsys):
    path = write(tmp_path, "good.py", GOOD)
    code, out, err = run(capsys, path, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["model"] == "model"
    assert [i["sites"] for i in data["invariances"]] == [["mu", "a"]]
    assert data["terms"] == {"y": [{"site": "mu", "params": ["loc"], "structure": "gather"},
                                   {"site": "a", "params": ["loc"], "structure": "gather"}]}


def test_model_option(tmp_path, capsys):
    path = write(tmp_path, "good.py", GOOD)
    code, out, err = run(capsys, path, "--model", "other", "--args", "(), {'y': np.zeros(4)}", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["model"] == "other"
    assert [i["sites"] for i in data["invariances"]] == [["mu", "b"]]


def test_args_tuple_overrides_model_args(tmp_path, capsys):
    path = write(tmp_path, "good.py", GOOD)
    code, out, err = run(capsys, path, "--args", "(np.array([0, 1, 1, 2]), np.zeros(4))", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert next(s for s in data["sites"] if s["name"] == "y")["shape"] == [4]


def test_args_pair_with_list(tmp_path, capsys):
    path = write(tmp_path, "good.py", GOOD)
    code, out, err = run(capsys, path, "--args", "[GROUP], {'y': jnp.zeros(6)}", "--json")
    assert code == 0, err
    assert json.loads(out)["invariances"][0]["sites"] == ["mu", "a"]


def test_no_inputs_at_all(tmp_path, capsys):
    path = write(tmp_path, "noargs.py", HEADER + """
def model():
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=jnp.zeros(3))
""")
    code, out, err = run(capsys, path)
    assert code == 0, err
    assert "additive terms of y: mu" in out


def test_module_imports_sibling_file(tmp_path, capsys):
    write(tmp_path, "helpers_for_cli_test.py", "N_GROUPS = 3\n")
    path = write(tmp_path, "uses_helper.py", GOOD.replace(
        "import numpy as np", "import numpy as np\nfrom helpers_for_cli_test import N_GROUPS"))
    code, out, err = run(capsys, path)
    assert code == 0, err
    assert str(tmp_path) not in sys.path


def test_module_with_dataclass(tmp_path, capsys):
    # A dataclass under postponed annotations is ordinary Python in a model file.
    path = write(tmp_path, "with_dataclass.py", "from __future__ import annotations\n"
                 "from dataclasses import dataclass\n" + GOOD + """

@dataclass
class Config:
    n_groups: int = 3
""")
    code, out, err = run(capsys, path)
    assert code == 0, err


# -- bad input: exit 2 ---------------------------------------------------------------------------

def test_missing_file(tmp_path, capsys):
    path = str(tmp_path / "nope.py")
    assert_error(capsys, 2, [path], path, "no such file")


def test_directory_instead_of_file(tmp_path, capsys):
    assert_error(capsys, 2, [str(tmp_path)], str(tmp_path))


def test_not_a_python_file(tmp_path, capsys):
    path = write(tmp_path, "model.txt", GOOD)
    assert_error(capsys, 2, [path], path, ".py")


def test_syntax_error(tmp_path, capsys):
    path = write(tmp_path, "broken.py", "import numpyro\n\ndef model(:\n    pass\n")
    line = assert_error(capsys, 2, [path], path, "syntax error")
    assert f"{path}:3" in line


def test_import_raises(tmp_path, capsys):
    path = write(tmp_path, "raises.py", "import numpy as np\nDATA = np.load('missing_data.npy')\n")
    assert_error(capsys, 2, [path], path, "FileNotFoundError", "missing_data.npy")


def test_import_raises_multiline_message(tmp_path, capsys):
    path = write(tmp_path, "raises2.py", "raise ValueError('bad config\\nsee the docs')\n")
    assert_error(capsys, 2, [path], path, "ValueError", "bad config")


def test_no_model_function_lists_candidates(tmp_path, capsys):
    path = write(tmp_path, "nomodel.py", HEADER + """
def hierarchical(y=None):
    pass

def pooled(y=None):
    pass

def _private():
    pass
""")
    line = assert_error(capsys, 2, [path], path, "'model'", "--model", "hierarchical", "pooled")
    assert "_private" not in line


def test_no_functions_at_all(tmp_path, capsys):
    path = write(tmp_path, "empty.py", "X = 1\n")
    assert_error(capsys, 2, [path], path, "'model'", "none")


def test_model_option_names_missing_function(tmp_path, capsys):
    path = write(tmp_path, "good.py", GOOD)
    assert_error(capsys, 2, [path, "--model", "hierarchical"], path, "'hierarchical'", "--model")


def test_model_option_names_non_function(tmp_path, capsys):
    path = write(tmp_path, "good.py", GOOD)
    assert_error(capsys, 2, [path, "--model", "GROUP"], path, "'GROUP'")


@pytest.mark.parametrize("expr, kind", [("3", "int"), ("{'y': GROUP}", "dict"),
                                        ("[GROUP, None]", "list"), ("GROUP", "ndarray")])
def test_args_not_a_tuple_or_pair(tmp_path, capsys, expr, kind):
    path = write(tmp_path, "good.py", GOOD)
    assert_error(capsys, 2, [path, "--args", expr], "--args", expr, kind, "tuple")


@pytest.mark.parametrize("expr, exc", [("1 / 0", "ZeroDivisionError"), ("(undefined_name,)", "NameError"),
                                       ("(1,", "SyntaxError")])
def test_args_that_raise(tmp_path, capsys, expr, exc):
    path = write(tmp_path, "good.py", GOOD)
    assert_error(capsys, 2, [path, "--args", expr], "--args", path, exc)


def test_args_that_raise_multiline_jax_error(tmp_path, capsys):
    path = write(tmp_path, "good_jax.py", "import jax\n" + GOOD)
    expr = "(GROUP, jax.jit(lambda n: jnp.zeros(n))(6))"
    assert_error(capsys, 2, [path, "--args", expr], "--args", path, "TypeError")


def test_args_non_array_input(tmp_path, capsys):
    path = write(tmp_path, "good.py", GOOD)
    assert_error(capsys, 2, [path, "--args", "(object(),)"], "args[0]", "object")


@pytest.mark.parametrize("body, kind", [("return GROUP", "ndarray"), ("return [(GROUP,), {}]", "list"),
                                        ("return (GROUP,), [1]", "tuple"), ("return None", "NoneType")])
def test_model_args_wrong_type(tmp_path, capsys, body, kind):
    path = write(tmp_path, "bad_args.py", GOOD.replace(
        'return (GROUP,), {"y": np.zeros(6, dtype=np.float32)}', body))
    assert_error(capsys, 2, [path], path, "model_args()", kind)


def test_model_args_first_item_not_a_sequence(tmp_path, capsys):
    # (args, kwargs) with args not a tuple/list: model_args() must return a pair (args, kwargs).
    path = write(tmp_path, "bad_args2.py", GOOD.replace(
        'return (GROUP,), {"y": np.zeros(6, dtype=np.float32)}', 'return GROUP, {"y": np.zeros(6)}'))
    assert_error(capsys, 2, [path], path, "model_args()")


def test_model_args_raises(tmp_path, capsys):
    path = write(tmp_path, "raising_args.py", GOOD.replace(
        'return (GROUP,), {"y": np.zeros(6, dtype=np.float32)}', 'return np.load("missing.npy")'))
    assert_error(capsys, 2, [path], path, "model_args()", "FileNotFoundError")


def test_model_args_raises_multiline_jax_error(tmp_path, capsys):
    path = write(tmp_path, "raising_args2.py", "import jax\n" + GOOD.replace(
        'return (GROUP,), {"y": np.zeros(6, dtype=np.float32)}',
        'return (GROUP,), {"y": jax.jit(lambda n: jnp.zeros(n))(6)}'))
    assert_error(capsys, 2, [path], path, "model_args()", "TypeError")


# -- analysis errors: exit 1 ---------------------------------------------------------------------

def test_model_that_raises(tmp_path, capsys):
    path = write(tmp_path, "model_raises.py", GOOD.replace(
        'mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))',
        'mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))\n    raise RuntimeError("boom")', 1))
    assert_error(capsys, 2, [path], path, "RuntimeError", "boom", "'mu'")


def test_model_without_observed_site_is_analysed_with_a_note(tmp_path, capsys):
    path = write(tmp_path, "no_obs.py", HEADER + """
def model():
    numpyro.sample("mu", dist.Normal(0.0, 1.0))
""")
    code, out, err = run(capsys, path)
    assert code == 0, err
    assert "note: the model has no observed site" in out and "empty: the model is left as it is" in out


def test_observed_shape_mismatch(tmp_path, capsys):
    path = write(tmp_path, "good.py", GOOD)
    assert_error(capsys, 2, [path, "--args", "(GROUP,), {'y': np.zeros(5)}"], path, "'y'", "(5,)")


def test_control_flow_on_latent(tmp_path, capsys):
    path = write(tmp_path, "control_flow.py", HEADER + """
def model(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    if mu > 0:
        mu = 2 * mu
    with numpyro.plate("n", 3):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def model_args():
    return (), {"y": np.zeros(3)}
""")
    assert_error(capsys, 2, [path], path)


def test_discrete_site_is_a_note(tmp_path, capsys):
    path = write(tmp_path, "discrete.py", GOOD.replace(
        'mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))',
        'mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))\n    numpyro.sample("k", dist.Bernoulli(0.5))', 1))
    code, out, err = run(capsys, path)
    assert code == 0, err
    assert "note: site 'k' is discrete" in out and "[discrete: left out]" in out
    code, out, err = run(capsys, path, "--json")
    assert any("'k'" in n for n in json.loads(out)["notes"])


def test_analyze_reports_a_drift_step_against_an_interaction(capsys):
    """docs/models/drift_interaction.py: drift[d, 0] against pairwise[:, d], one per d (README output)."""
    path = os.path.join(ROOT, "docs", "models", "drift_interaction.py")
    code, out, err = run(capsys, path)
    assert code == 0, err
    assert "{drift, pairwise}  dim 3    in y:" in out
    assert "pairwise <- drift (gather" in out


def test_analyze_reports_directions_inside_one_site_in_text_and_json(capsys):
    """docs/models/inside_one_site.py: collinear design columns and a giver/receiver sum (README output)."""
    path = os.path.join(ROOT, "docs", "models", "inside_one_site.py")
    code, out, err = run(capsys, path)
    assert code == 0, err
    assert "directions inside one site (2):" in out
    assert "{beta}  dim 1    in y: reads 5 values of beta through a rank-4 map; beta[0] - beta[1] - beta[2] - beta[3]" in out
    assert "gr[0, 0] - gr[0, 1], gr[1, 0] - gr[1, 1], gr[2, 0] - gr[2, 1], ..." in out
    assert "note: site 'gr' has 4 directions inside it that 'y' does not see; the plan leaves them to the prior" in out
    code, out, err = run(capsys, path, "--json")
    assert code == 0, err
    within = json.loads(out)["within"]
    assert [(w["site"], w["dim"], w["rank"]) for w in within] == [("beta", 1, 4), ("gr", 4, 4)]
    assert within[1]["directions"] == ["gr[0, 0] - gr[0, 1]", "gr[1, 0] - gr[1, 1]", "gr[2, 0] - gr[2, 1]"]
    assert max(w["residual"] for w in within) < 1e-4
