"""Benchmark: ``autoreparam.analyze`` on the tensor model at scale.

    python benchmarks/bench_analysis.py            # N ~ 1e4, 1e5, 3e5, 1e6 observations
    python benchmarks/bench_analysis.py --quick    # N ~ 1e4, 1e5 only
    python benchmarks/bench_analysis.py --sizes 260 320 450   # any I = J values (T = 10)
    python benchmarks/bench_analysis.py --profile  # also cProfile analyze at the largest size
                                                   # (its first-call time then includes cProfile's overhead)

The model is ``examples/tensor_model.py``'s ``model`` (y_ijt = mu + a_i + b_j + z_t + A_it + B_jt
+ C_ij + noise) with T = 10 and I = J growing; at I = J = 320 there are 1,024,000 observations
and C alone has 102,400 elements. Every size runs in a fresh subprocess, so the peak resident
set size (``ru_maxrss`` of that child) belongs to that size only. A second child per size only
imports jax/numpyro/autoreparam, builds the same data and puts it on the device: its peak RSS is
the baseline that is subtracted to get the memory used by the analysis itself.

Per size the benchmark records the wall time of the first ``analyze`` call (it includes JAX
tracing and compilation), of a second call on the same inputs, the peak RSS, the number of
additive invariant pairs and whether each pair's dimension is the one the model's structure
implies (e.g. {a, C}: I, {z, A}: T, {mu, a}: 1). It prints a markdown table and writes
``benchmarks/results/analysis_scale.json``. A size whose analysis raises (or is killed, or times
out) is recorded as failed with the exception and the autoreparam line it came from, and the
ladder goes on; the exit code is 1 if any size failed or found the wrong dimensions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXAMPLES = ROOT / "examples"
RESULTS = HERE / "results" / "analysis_scale.json"

T_STEPS = 10
FULL_LADDER = [32, 100, 175, 320]  # I = J; N = I * J * T ~ 1.0e4, 1.0e5, 3.1e5, 1.02e6
QUICK_LADDER = [32, 100]


# -- what the model's structure implies ------------------------------------------------------
def expected_pairs(I: int, J: int, T: int) -> dict[tuple[str, str], int]:
    """Dimension of range(J_A) & range(J_B) for every pair of additive terms of y."""
    return {
        ("mu", "z"): 1, ("mu", "a"): 1, ("mu", "A"): 1, ("mu", "b"): 1, ("mu", "B"): 1, ("mu", "C"): 1,
        ("z", "a"): 1, ("z", "A"): T, ("z", "b"): 1, ("z", "B"): T, ("z", "C"): 1,
        ("a", "A"): I, ("a", "b"): 1, ("a", "B"): 1, ("a", "C"): I,
        ("A", "b"): 1, ("A", "B"): T, ("A", "C"): I,
        ("b", "B"): J, ("b", "C"): J,
        ("B", "C"): J,
    }


def latent_elements(I: int, J: int, T: int) -> dict[str, int]:
    return {"scalars": 8, "z": T, "a": I, "A": I * T, "b": J, "B": J * T, "C": I * J}


# -- child processes -------------------------------------------------------------------------
def _maxrss_bytes() -> int:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb) * (1 if sys.platform == "darwin" else 1024)


def _cpu_seconds() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def _build(I: int, J: int, T: int):
    """Import everything, build the data, put it on the device (shared by both child kinds)."""
    sys.path.insert(0, str(EXAMPLES))
    import jax
    import jax.numpy as jnp
    import numpyro  # noqa: F401

    import autoreparam  # noqa: F401
    from tensor_model import model, simulate

    t0 = time.perf_counter()
    y = jnp.asarray(simulate(I, J, T))
    y.block_until_ready()
    jax.block_until_ready(jnp.sum(y))  # initialise the backend
    return model, y, time.perf_counter() - t0


def child_baseline(I: int, J: int, T: int) -> dict:
    _, y, t_data = _build(I, J, T)
    return {"data_seconds": t_data, "peak_rss": _maxrss_bytes(), "data_bytes": int(y.nbytes)}


def child_analyze(I: int, J: int, T: int, second: bool, profile: str | None) -> dict:
    import autoreparam
    from autoreparam import analyze

    model, y, t_data = _build(I, J, T)
    out = {"data_seconds": t_data, "rss_before": _maxrss_bytes(), "data_bytes": int(y.nbytes),
           "autoreparam_file": autoreparam.__file__}

    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
    out["load_before"] = _load()
    t0, c0 = time.perf_counter(), _cpu_seconds()
    try:
        if prof:
            prof.enable()
        report = analyze(model, I, J, T, y=y)
    except Exception as exc:  # noqa: BLE001 - a failure is a result: record it and where it happened
        out.update(_failure(exc), first_seconds=time.perf_counter() - t0,
                   first_cpu_seconds=_cpu_seconds() - c0, peak_rss=_maxrss_bytes(), load_after=_load())
        return out
    finally:
        if prof:
            prof.disable()
            prof.dump_stats(profile)
    out["first_seconds"] = time.perf_counter() - t0
    out["first_cpu_seconds"] = _cpu_seconds() - c0
    out["rss_after_first"] = _maxrss_bytes()

    if second:
        t0, c0 = time.perf_counter(), _cpu_seconds()
        report = analyze(model, I, J, T, y=y)
        out["second_seconds"] = time.perf_counter() - t0
        out["second_cpu_seconds"] = _cpu_seconds() - c0
    out["load_after"] = _load()
    out["peak_rss"] = _maxrss_bytes()
    out["rss_end"] = _current_rss_bytes()

    found = {inv.sites: inv.dim for inv in report.additive() if inv.observed == "y"}
    expected = expected_pairs(I, J, T)
    wrong = {f"{a},{b}": {"found": found.get((a, b)), "expected": d}
             for (a, b), d in expected.items() if found.get((a, b)) != d}
    extra = sorted(f"{a},{b}" for (a, b) in found if (a, b) not in expected)
    out.update(
        pairs=len(found),
        pairs_expected=len(expected),
        dims_ok=not wrong and not extra,
        wrong_dims=wrong,
        extra_pairs=extra,
        found_dims={f"{a},{b}": d for (a, b), d in found.items()},
        max_residual=float(max((inv.residual for inv in report.additive()), default=0.0)),
        terms=[f"{t.site}:{t.structure}" for t in report.terms["y"]],
        local_tradeoffs=len([i for i in report.invariances if i.kind != "additive"]),
        funnels=[f.site for f in report.funnels],
        notes=list(report.notes),
        latent_in_report=int(sum(s.size for s in report.sites.values() if s.type == "latent")),
        observed_in_report=int(sum(s.size for s in report.sites.values() if s.type == "observed")),
    )
    return out


def _failure(exc: BaseException) -> dict:
    """The exception in one line, and the innermost autoreparam frame it came through."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/autoreparam/" in f.filename.replace(os.sep, "/")]
    where = ours[-1] if ours else (frames[-1] if frames else None)
    text = str(exc).strip().splitlines()
    return {
        "error": f"{type(exc).__name__}: {text[0] if text else ''}",
        "error_at": None if where is None else
        f"{Path(where.filename).name}:{where.lineno} in {where.name}: {where.line}",
        "traceback": [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames],
    }


def run_child(kind: str, I: int, J: int, T: int, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, str(I), str(J), str(T)]
    if kind == "analyze" and not args.no_second:
        cmd.append("--second")
    if kind == "analyze" and args.profile and I == args._largest:
        prof = args.out.parent / f"analyze_profile_I{I}.pstats"
        cmd += ["--profile-out", str(prof)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {args.timeout:.0f} s", "process_seconds": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        # killed (e.g. by the OOM killer) or crashed outside analyze
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        return {"error": f"child exited with code {proc.returncode}: {tail[0]}", "process_seconds": wall}
    res = json.loads(lines[-1][len("RESULT "):])
    res["process_seconds"] = wall
    return res


# -- reporting -------------------------------------------------------------------------------
def machine_info() -> dict:
    sys.path.insert(0, str(HERE))
    from machine import machine_info as base_machine_info

    info = base_machine_info()
    try:
        example = EXAMPLES / "tensor_model.py"
        changed = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", str(example)],
                                 capture_output=True, text=True).stdout.strip()
        info["example"] = {"path": "examples/tensor_model.py", "modified_vs_git": bool(changed),
                           "sha256": hashlib.sha256(example.read_bytes()).hexdigest()[:16]}
    except OSError:
        pass
    import importlib.metadata as md
    import importlib.util

    spec = importlib.util.find_spec("autoreparam")
    info["autoreparam_file"] = spec.origin if spec else None

    for pkg in ("jax", "jaxlib", "numpyro", "numpy", "scipy", "autoreparam"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return info


def fit_slope(xs, ys):
    """Least-squares line y = c0 + c1 x; returns (c0, c1)."""
    n = len(xs)
    if n < 2:
        return None, None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None, None
    c1 = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - c1 * mx, c1


def mib(b) -> str:
    return f"{b / 2**20:.0f}"


def _cell(r: dict, key: str, fmt) -> str:
    v = r.get(key)
    return "-" if v is None else fmt(v)


def table(rows: list[dict]) -> str:
    head = ("| I=J | T | N obs | latent elems | size of C | analyze 1st (s) | 1st CPU (s) | analyze 2nd (s) "
            "| peak RSS (MiB) | baseline RSS (MiB) | analysis RSS (MiB) | analysis B/obs | pairs | dims ok |")
    sep = "|" + "---|" * (head.count("|") - 1)
    lines = [head, sep]
    for r in rows:
        failed = "error" in r
        first = _cell(r, "first_seconds", lambda v: f"{v:.1f}") + (" (failed)" if failed else "")
        second = _cell(r, "second_seconds", lambda v: f"{v:.1f}")
        per_obs = "-" if failed else _cell(r, "analysis_rss", lambda v: f"{v / r['N']:.0f}")
        pairs = _cell(r, "pairs", lambda v: f"{v}/{r['pairs_expected']}")
        ok = "FAILED" if failed else "yes" if r["dims_ok"] else "NO"
        lines.append(
            f"| {r['I']} | {r['T']} | {r['N']:,} | {r['latent']:,} | {r['C_size']:,} | {first} "
            f"| {_cell(r, 'first_cpu_seconds', lambda v: f'{v:.1f}')} | {second} "
            f"| {_cell(r, 'peak_rss', mib)} | {_cell(r, 'baseline_rss', mib)} | {_cell(r, 'analysis_rss', mib)} "
            f"| {per_obs} | {pairs} | {ok} |"
        )
    for r in rows:
        if "error" in r:
            lines.append("")
            lines.append(f"I=J={r['I']} (N={r['N']:,}) failed: {r['error']}"
                         + (f" at {r['error_at']}" if r.get("error_at") else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes only (N ~ 1e4, 1e5)")
    p.add_argument("--sizes", type=int, nargs="+", metavar="I",
                   help=f"I = J values to run (T = {T_STEPS}); default {FULL_LADDER}")
    p.add_argument("--no-second", action="store_true", help="skip the second analyze call")
    p.add_argument("--profile", action="store_true",
                   help="cProfile the first analyze call at the largest size (pstats in benchmarks/results/)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    # internal: child mode
    p.add_argument("--child", choices=["analyze", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("dims", nargs="*", type=int, help=argparse.SUPPRESS)
    p.add_argument("--second", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--profile-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        I, J, T = args.dims
        if args.child == "baseline":
            res = child_baseline(I, J, T)
        else:
            res = child_analyze(I, J, T, args.second, args.profile_out)
        print("RESULT " + json.dumps(res))
        return 0

    ladder = args.sizes or (QUICK_LADDER if args.quick else FULL_LADDER)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args._largest = max(ladder)
    machine = machine_info()
    machine["load_at_start"] = _load()
    print(f"machine: {machine.get('cpu')} x{machine.get('nproc')}, {machine.get('ram_gib')} GiB RAM; "
          f"jax {machine.get('jax')}, numpyro {machine.get('numpyro')}; "
          f"autoreparam from {machine.get('autoreparam_file')} (git {machine.get('git')})", flush=True)

    rows = []
    for I in ladder:
        J, T = I, T_STEPS
        N = I * J * T
        lat = latent_elements(I, J, T)
        print(f"I=J={I}, T={T}: N={N:,}, latent={sum(lat.values()):,} ... ", end="", flush=True)
        base = run_child("baseline", I, J, T, args)
        res = run_child("analyze", I, J, T, args)
        row = {"I": I, "J": J, "T": T, "N": N,
               "latent": sum(lat.values()), "latent_by_site": lat, "C_size": lat["C"],
               "baseline_rss": base.get("peak_rss"), **res}
        if row.get("peak_rss") is not None and row["baseline_rss"] is not None:
            row["analysis_rss"] = row["peak_rss"] - row["baseline_rss"]
        rows.append(row)
        if "error" in res:
            print(f"FAILED after {_cell(res, 'first_seconds', lambda v: f'{v:.1f} s')}, "
                  f"peak RSS {_cell(res, 'peak_rss', mib)} MiB: {res['error']}"
                  + (f"\n  at {res['error_at']}" if res.get("error_at") else ""), flush=True)
            continue
        if res["latent_in_report"] != row["latent"] or res["observed_in_report"] != N:
            raise RuntimeError(f"size mismatch: report has {res['latent_in_report']} latent, "
                               f"{res['observed_in_report']} observed values")
        second = f", 2nd {res['second_seconds']:.1f} s" if "second_seconds" in res else ""
        second += f", load avg {res.get('load_before')}"
        print(f"1st {res['first_seconds']:.1f} s{second}, peak RSS {mib(res['peak_rss'])} MiB "
              f"(baseline {mib(base['peak_rss'])} MiB), pairs {res['pairs']}, "
              f"dims {'ok' if res['dims_ok'] else 'WRONG'}", flush=True)
        if not res["dims_ok"]:
            print(f"  wrong dims: {res['wrong_dims']}, extra pairs: {res['extra_pairs']}", flush=True)

    ok_rows = [r for r in rows if "error" not in r]
    c0, c1 = fit_slope([r["N"] for r in ok_rows], [r["analysis_rss"] for r in ok_rows])
    t0, t1 = fit_slope([r["N"] for r in ok_rows], [r["first_seconds"] for r in ok_rows])
    fit = {
        "sizes_used": [r["N"] for r in ok_rows],
        "analysis_rss_bytes_per_obs": c1, "analysis_rss_intercept_bytes": c0,
        "first_call_seconds_per_million_obs": None if t1 is None else t1 * 1e6,
        "first_call_intercept_seconds": t0,
    }

    machine["load_at_end"] = _load()
    print()
    print(table(rows))
    print(f"\n1-minute load average: {machine['load_at_start'][0] if machine['load_at_start'] else '?'} at start, "
          f"{machine['load_at_end'][0] if machine['load_at_end'] else '?'} at end "
          f"({machine['nproc']} CPUs); a load above the CPU count means other processes shared them "
          "and the wall times are inflated")
    print()
    if c1 is not None:
        print(f"analysis memory (peak RSS - baseline) ~ {c0 / 2**20:.0f} MiB + {c1:.0f} bytes/observation "
              f"(least squares over the {len(ok_rows)} sizes that completed)")
        print(f"first-call time ~ {t0:.1f} s + {t1 * 1e6:.1f} s per 10^6 observations")
        steps = [f"{a['N']:,} -> {b['N']:,}: {(b['analysis_rss'] - a['analysis_rss']) / (b['N'] - a['N']):.0f}"
                 for a, b in zip(ok_rows, ok_rows[1:])]
        print("marginal analysis memory, bytes per added observation: " + "; ".join(steps))
        fit["marginal_bytes_per_obs"] = [
            {"from_N": a["N"], "to_N": b["N"],
             "bytes_per_obs": (b["analysis_rss"] - a["analysis_rss"]) / (b["N"] - a["N"])}
            for a, b in zip(ok_rows, ok_rows[1:])]
    else:
        print(f"no fit: {len(ok_rows)} size(s) completed, need at least 2")
    for r in ok_rows:
        if r["notes"]:
            print(f"notes at I={r['I']}: " + "; ".join(r["notes"]))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "autoreparam.analyze on examples/tensor_model.py",
        "command": " ".join(["python", "benchmarks/bench_analysis.py", *(sys.argv[1:] if argv is None else argv)]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "fit": fit,
        "rows": rows,
        "table_markdown": table(rows),
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0 if all("error" not in r and r["dims_ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
