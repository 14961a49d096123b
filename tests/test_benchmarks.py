"""The benchmark harness cannot rot: its quick mode runs here end to end, and its arithmetic is checked.

The quick run covers every method on two models (a real-data one with a shipped reference and a
dense hybrid block, and a synthetic Laplace one with a NUTS reference); the VI methods other than the
hybrid, one class whatever the model, are fitted on the first model only (``--vi-models``: their six
compiles were 100 s of the second model's 250 s of CPU). The other models' inputs and shipped
references are checked without fitting (the whole quick run took 400 s of the suite).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import harness  # noqa: E402
from benchmarks.__main__ import BEGIN, END, main as bench_main, partition, paste  # noqa: E402
from benchmarks.models import MODELS, load_reference  # noqa: E402


QUICK_MODELS = ["eight_schools", "crossed_logistic"]
# A run of some of the models writes its plots as *_quick_subset.png (never over a whole run's).
PLOTS = ("elbo_vs_steps_quick_subset.png", "sd_ratio_per_site_quick_subset.png")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--models", *QUICK_MODELS, "--vi-models", QUICK_MODELS[0],
         "--out", str(out / "quick.json"), "--plots", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads((out / "quick.json").read_text()), proc.stdout


def test_quick_run_has_every_model_and_method(quick_run):
    _, results, _ = quick_run
    assert list(results["models"]) == QUICK_MODELS
    for name, m in results["models"].items():
        assert "failed" not in m, (name, m.get("failed"))
        assert m["errors"] == {}, (name, m["errors"])
        assert set(m["methods"]) | set(m["skipped"]) == set(harness.METHODS), name
        assert not set(m["methods"]) & set(m["skipped"]), name
        for meth, r in m["methods"].items():
            if r["kind"] == "vi":
                s = r["summary"]
                # A baseline guide may blow up (that is a result); the package's own may not.
                assert (s["elbo"] is not None and np.isfinite(s["elbo"])) or (
                    s["diverged"] == s["seeds"] and not meth.startswith("autoreparam")), (name, meth)
                assert len(r["runs"][0]["checkpoints"]) == harness.CONFIGS["quick"]["checkpoints"]
                assert set(r["summary"]["sites"]) == set(m["latent_sites"])
            else:
                # 2 chains x 30 draws: the ESS estimate itself can come out negative; it must exist.
                assert np.isfinite(r["min_ess"]) and r["divergences"] >= 0 and r["max_rhat"] is not None
        assert m["best_elbo"] == max(r["summary"]["elbo"] for r in m["methods"].values()
                                     if r["kind"] == "vi" and r["summary"]["elbo"] is not None)
    # Collapsed NUTS and Gibbs run on eight schools (quick mode); the Laplace block of the logistic model
    # is left to NUTS on the offsets, with the reason.
    eight = results["models"]["eight_schools"]
    assert {"NUTS collapsed", "Gibbs"} <= set(eight["methods"]) and eight["mcmc_choice"]["method"] == "collapsed"
    assert eight["methods"]["NUTS collapsed"]["block_size"] == 9
    logistic = results["models"]["crossed_logistic"]
    assert logistic["mcmc_choice"]["method"] == "offsets" and "Bernoulli" in logistic["mcmc_choice"]["reason"]
    assert "NUTS collapsed" in logistic["skipped"] and "Gibbs" in logistic["skipped"]
    assert results["models"]["eight_schools"]["reference"]["kind"].startswith("posteriordb")
    # Every method ran on some model; on the second model the plain VI methods are skipped with the reason.
    assert set().union(*(m["methods"] for m in results["models"].values())) == set(harness.METHODS)
    plain_vi = set(harness.VI_METHODS) - {"hybrid"}
    assert plain_vi <= set(eight["methods"]) and "hybrid" in logistic["methods"]
    assert all("--vi-models" in logistic["skipped"][name] for name in plain_vi)
    assert results["config"]["vi_models"] == [QUICK_MODELS[0]]


def test_quick_run_writes_table_and_plots(quick_run):
    out, results, stdout = quick_run
    md = (out / "quick.md").read_text()
    assert md == results["report_markdown"] + "\n"
    assert "### Summary" in stdout and all(f"### {name}:" in md for name in QUICK_MODELS)
    for plot in PLOTS:
        data = (out / plot).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        (out / plot).unlink()
    # --rebuild republishes the same tables and plots from the JSON alone.
    assert bench_main(["--rebuild", "--out", str(out / "quick.json"), "--plots", str(out)]) == 0
    assert (out / "quick.md").read_text() == md
    assert all((out / plot).exists() for plot in PLOTS)


def test_rebuild_without_results_says_so(tmp_path, capsys):
    assert bench_main(["--rebuild", "--out", str(tmp_path / "none.json")]) == 2
    assert "none.json" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_seeds_must_be_positive(capsys, monkeypatch):
    monkeypatch.setitem(harness.CONFIGS, "full", dict(harness.CONFIGS["full"]))
    assert bench_main(["--seeds", "0", "--models", "eight_schools", "--no-plots"]) == 2
    assert "--seeds 0: expected a positive integer" in capsys.readouterr().err
    assert harness.CONFIGS["full"]["seeds"] == 3


@pytest.mark.parametrize("name", [n for n in MODELS if n not in QUICK_MODELS])
def test_models_not_fitted_in_quick_mode_trace_at_their_quick_size(name):
    spec = MODELS[name]
    args, kwargs = spec.inputs("quick")
    sites = harness.latent_sites(spec.module.model, args, kwargs)
    assert sites and all(int(np.prod(shape)) > 0 for shape in sites.values())
    assert spec.size("quick")


@pytest.mark.parametrize("name", [n for n, s in MODELS.items() if s.reference != "nuts"])
def test_shipped_reference_matches_the_example_model(name):
    spec = MODELS[name]
    args, kwargs = spec.inputs("full")
    sites = harness.latent_sites(spec.module.model, args, kwargs)
    ref = load_reference(spec)
    assert set(ref) == set(sites)
    for s, shape in sites.items():
        assert np.shape(ref[s]["mean"]) == shape and np.shape(ref[s]["sd"]) == shape, s
        assert np.all(ref[s]["sd"] > 0), s


def test_compare_measures_mean_error_and_sd_ratio_in_reference_sds():
    ref = {"a": {"mean": np.zeros(3), "sd": np.array([1.0, 2.0, 4.0]), "mean_se": None},
           "b": {"mean": np.array(1.0), "sd": np.array(0.5), "mean_se": None}}
    moments = {"a": (np.array([1.0, 1.0, 1.0]), np.array([1.0, 1.0, 1.0])),
               "b": (np.array(1.0), np.array(0.05))}
    got = harness.compare(moments, ref)
    assert got["sites"]["a"]["mean_err"] == pytest.approx(0.5)  # median of 1, 0.5, 0.25
    assert got["sites"]["a"]["mean_err_max"] == pytest.approx(1.0)
    assert got["sites"]["a"]["sd_ratio_min"] == pytest.approx(0.25)
    assert got["summary"]["sd_ratio_worst_site"] == "b"  # 0.1 is further from 1 than 0.5
    assert got["summary"]["sd_ratio_worst"] == pytest.approx(0.1)
    assert got["summary"]["mean_err_worst_site"] == "a"


def _vi_run(elbos, seed=0):
    cmp = {"sites": {"x": {k: 1.0 for k in ("mean_err", "mean_err_max", "sd_ratio", "sd_ratio_min", "sd_ratio_max")}},
           "summary": {"mean_err_worst": 0.0, "mean_err_worst_site": "x", "mean_err_median": 0.0,
                       "sd_ratio_worst": 1.0, "sd_ratio_worst_site": "x", "sd_ratio_median": 1.0}}
    ckpts = [(100 * (i + 1), 0.5 * (i + 1), e, 0.1) for i, e in enumerate(elbos)]
    return {"seed": seed, "elbo": elbos[-1], "elbo_se": 0.1, "checkpoints": ckpts,
            "seconds_per_1000_steps": 5.0, "svi_seconds": 0.5 * len(elbos), "compare": cmp}


def test_summary_steps_to_one_nat_are_medians_with_unreached_seeds_as_infinite():
    out = {"methods": {
        "AutoNormal": {"kind": "vi", "runs": [_vi_run([-50, -20, -10.5]), _vi_run([-50, -30, -12], 1),
                                               _vi_run([-40, -11, -10], 2)]},
        "autoreparam analytic": {"kind": "vi", "runs": [_vi_run([-10.2, -10, -10]), _vi_run([-30, -20, -14], 1),
                                                         _vi_run([-15, -9.8, -9.5], 2)]},
    }}
    harness.summarize(out)
    assert out["best_elbo"] == -10.0  # the median final ELBO of the analytic method
    an, plain = out["methods"]["autoreparam analytic"]["summary"], out["methods"]["AutoNormal"]["summary"]
    assert an["reach_step"] == 200  # reached at 100, 200 and never
    assert an["reached"] == 2
    assert plain["reach_step"] == 300 and plain["reach_seconds"] == 1.5  # 300, never, 200
    assert out["ratios"]["elbo_gain_analytic_vs_AutoNormal"] == pytest.approx(0.5)


def test_partition_keeps_quick_models_of_one_example_together():
    groups = partition(list(MODELS), 2, "quick")
    assert sorted(m for g in groups for m in g) == sorted(MODELS)
    assert any({"tensor_small", "tensor_large"} <= set(g) for g in groups)
    assert len(partition(["eight_schools"], 4, "full")) == 1


def test_a_diverged_run_is_no_best_elbo_and_never_reaches():
    blown = _vi_run([-50, 3e24, 3e24])
    blown["diverged"], blown["elbo_se"] = True, 7e22
    out = {"methods": {
        "AutoMVN": {"kind": "vi", "runs": [blown, _vi_run([-50, -40, -30], 1)]},
        "autoreparam analytic": {"kind": "vi", "runs": [_vi_run([-20, -12, -11])]},
    }}
    harness.summarize(out)
    mvn = out["methods"]["AutoMVN"]["summary"]
    assert out["best_elbo_method"] == "autoreparam analytic" and out["best_elbo"] == -11
    assert mvn["diverged"] == 1 and mvn["elbo"] is None  # median of -inf and -30
    assert mvn["reached"] == 0 and mvn["elbo_max"] == -30
    assert out["ratios"]["elbo_gain_analytic_vs_AutoMVN"] is None


def test_paste_replaces_only_the_marked_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nprose\n{BEGIN}\nold table\n{END}\n\nmore prose\n")
    assert paste(readme, "| new | table |\n")
    assert readme.read_text() == f"# Title\n\nprose\n{BEGIN}\n| new | table |\n{END}\n\nmore prose\n"
    plain = tmp_path / "OTHER.md"
    plain.write_text("no markers\n")
    assert not paste(plain, "x") and plain.read_text() == "no markers\n"


def test_a_lucky_checkpoint_is_not_reached_unless_the_elbo_stays():
    out = {"methods": {"autoreparam analytic": {"kind": "vi", "runs": [_vi_run([-10.5, -15, -10.2, -10])]}}}
    harness.summarize(out)
    assert out["methods"]["autoreparam analytic"]["summary"]["reach_step"] == 300


def test_target_reach_reads_the_targets_only_at_checkpoints_with_draws():
    ref = {"x": {"mean": np.zeros(1), "sd": np.ones(1), "mean_se": None}}
    good, bad = (np.zeros(1), np.ones(1)), (np.ones(1), np.ones(1))  # mean error 0 and 1 ref sds
    # Checkpoints 2 and 4 have no draws (the CG path with resampling): the targets hold from 3 on.
    run = {"checkpoints": [(100 * (i + 1), float(i + 1), None, None) for i in range(5)],
           "_ckpt_moments": [{"x": bad}, None, {"x": good}, None, {"x": good}], "_plain_moments": None,
           "compare": harness.compare({"x": good}, ref)}
    harness.target_reach("tensor_large", run, ref)
    assert run["target_step"] == 300 and run["target_met_at_end"]


# -- the cold-start benchmark (benchmarks/cold_start.py) -------------------------------------------

def test_cold_start_child_cpu_counts_the_child_not_the_parent():
    from benchmarks.cold_start import child_cpu

    busy, out = child_cpu([sys.executable, "-c", "import time\nt = time.process_time()\n"
                           "while time.process_time() - t < 0.3: pass\nprint('done')"])
    idle, _ = child_cpu([sys.executable, "-c", "import time; time.sleep(0.3)"])
    assert out.strip() == "done"
    assert busy >= 0.3 > idle


def test_cold_start_child_failure_is_an_error():
    from benchmarks.cold_start import child_cpu

    with pytest.raises(RuntimeError, match="exited with 3"):
        child_cpu([sys.executable, "-c", "import sys; sys.exit(3)"])


def test_cold_start_table_marks_targets():
    from benchmarks.cold_start import markdown

    payload = {"created": "now", "git": "abc", "machine": "2 CPUs", "repeats": 1, "command": "cmd", "cache": None,
               "examples": {"eight_schools": {"analyze": 4.0, "import": 2.5, "beyond_import": 1.5, "jit": 0.3,
                                              "ratio": 5.0},
                            "crossed_logistic": {"analyze": 3.0, "import": 2.5, "beyond_import": 0.5, "jit": 0.5,
                                                 "ratio": 1.0}},
               "gradients": {"radon_mn": {"original": 2e-5, "reparameterized": 3e-5, "ratio": 1.5,
                                          "ratios": [1.4, 1.5, 1.6]},
                             "eight_schools": {"original": 4.1e-7, "reparameterized": 5e-7, "ratio": 1.22,
                                               "ratios": [1.22]}}}
    text = markdown(payload)
    assert "| eight_schools | 4.00 | 2.50 | 1.50 (> 1) | 0.30 | 5.0x |" in text
    assert "| crossed_logistic | 3.00 | 2.50 | 0.50 | 0.50 | 1.0x |" in text  # no target for this example
    assert "| radon_mn | 20 us | 30 us | 1.50x (> 1.3) | 1.40, 1.50, 1.60 |" in text
    assert "| eight_schools | 0.41 us | 0.5 us | 1.22x (<= 1.3) | 1.22 |" in text


def test_cold_start_gradients_only_write_their_own_file():
    from benchmarks.cold_start import HERE, parse

    assert parse(["--no-examples"]).examples == []
    assert parse(["--no-examples"]).out == HERE / "results" / "gradient.json"
    assert parse(["--examples"]).out == HERE / "results" / "gradient.json"
    assert parse([]).out == HERE / "results" / "cold_start.json"
    assert parse(["--examples", "--no-gradient"]).out == HERE / "results" / "cold_start.json"


def test_cold_start_gradient_loop_evaluates_n_times():
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from benchmarks.cold_start import _gradient_programs

    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    y = jnp.array([0.5, 1.5])
    loop, z = _gradient_programs(model, model, (y,), {})["original"]
    # At z: potential 0.5 mu^2 + 0.5 sum (y - mu)^2 + const, gradient 3 mu - sum y; eps = 0 keeps z.
    once, three = float(loop(z, 1, 0.0)), float(loop(z, 3, 0.0))
    assert three == pytest.approx(3 * once, rel=1e-6)
    moved = float(loop(z, 3, 0.1))  # eps != 0 moves z along the gradient: the passes differ
    assert moved != pytest.approx(three, rel=1e-6)


def test_cold_start_gradient_flags_reach_xla():
    from benchmarks.cold_start import GRADIENT_XLA_FLAGS

    # The small-while-loop pass would compile this loop into one function (an xla_cpu_small_call);
    # the flags must switch it off, which they do only if XLA parses them all.
    code = ("import jax, jax.numpy as jnp\n"
            "f = jax.jit(lambda x, n: jax.lax.fori_loop(0, n, lambda i, c: c * 1.5 + 1, x))\n"
            "print(f.lower(jnp.ones(3), 5).compile().as_text().count('xla_cpu_small_call'))")
    counts = {}
    for flags in ("", GRADIENT_XLA_FLAGS):
        env = dict(os.environ, XLA_FLAGS=flags)
        counts[flags] = int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                           check=True).stdout.strip())
    assert counts[""] > 0 and counts[GRADIENT_XLA_FLAGS] == 0
