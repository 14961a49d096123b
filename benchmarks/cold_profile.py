"""``python -m benchmarks.cold_profile EXAMPLE``: where a cold analyze of one example spends its CPU.

Prints the process CPU of ``analyze`` and of the plan, then every XLA compilation in order: its CPU
seconds, the program's name and the autoreparam frames that asked for it (a wrapper around JAX's
``backend_compile_and_load``). Run it in a fresh process, from the repository root:

    python -m benchmarks.cold_profile eight_schools
"""

from __future__ import annotations

import sys
import time
import traceback


def main(argv=None) -> int:
    import jax  # noqa: F401 - imported before the timed region, as the cold-start benchmark subtracts it
    import numpyro  # noqa: F401
    from jax._src import compiler

    from benchmarks.cold_start import _load_example

    name = (sys.argv[1:] if argv is None else argv)[0]
    compiles = []
    backend_compile = compiler.backend_compile_and_load

    def timed_compile(*args, **kwargs):
        start = time.process_time()
        out = backend_compile(*args, **kwargs)
        try:
            program = str(args[1].operation.attributes["sym_name"]).strip('"')
        except Exception:  # noqa: BLE001 - a JAX that calls it otherwise: no name
            program = "?"
        frames = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}({f.name})" for f in traceback.extract_stack()
                  if "/autoreparam/" in f.filename]
        compiles.append((time.process_time() - start, program, " <- ".join(frames[::-1][:3])))
        return out

    compiler.backend_compile_and_load = timed_compile
    start = time.process_time()
    from autoreparam.api import analyze

    module = _load_example(name)
    args, kwargs = module.model_args()
    imported = time.process_time()
    report = analyze(module.model, *args, **kwargs)
    analysed = time.process_time()
    report.plan
    planned = time.process_time()
    print(f"{name}: import autoreparam + example {imported - start:.2f} s, analyze {analysed - imported:.2f} s, "
          f"plan {planned - analysed:.2f} s; XLA compiles {sum(c[0] for c in compiles):.2f} s in "
          f"{len(compiles)} programs")
    for seconds, program, where in compiles:
        print(f"  {seconds:6.3f} s  {program:28s} {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
