"""What a ``tune.report`` costs inside a Tune function trainable (the sweep's 1-worker trials).

A function trainable's ``tune.report`` hands the result to Tune's driver and waits for it to ask for
the next one, so each report costs a round trip through the driver's event loop. This bench runs
the same fixed work (``--iterations`` steps of a ``--size`` matmul on one thread) in Tune trials that
report every step and every ``--period`` steps, alternating, ``--repeats`` times, one trial at a
time on one local Ray cluster, and prints the median wall time of each and the cost per report:
``(wall(every 1) - wall(every N)) / (reports(every 1) - reports(every N))``.

    python bench/tune_report_cost.py                      # 200 steps, every 1 vs every 20, 3 repeats
    python bench/tune_report_cost.py --iterations 400 --period 50 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def trial(config: dict) -> None:
    import torch
    from ray import tune

    torch.set_num_threads(1)
    a = torch.randn(config["size"], config["size"])
    t0 = time.perf_counter()
    for it in range(1, config["iterations"] + 1):
        a = torch.tanh(a @ a)
        if it % config["period"] == 0:
            tune.report({"iteration": it, "wall_s": time.perf_counter() - t0})
    tune.report({"iteration": config["iterations"], "wall_s": time.perf_counter() - t0})


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--period", type=int, default=20)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # read when Ray is imported
    import ray
    from ray import tune

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    walls: dict[int, list[float]] = {1: [], a.period: []}
    storage = Path(os.environ.get("TMPDIR", "/tmp")) / f"tune_report_cost_{os.getpid()}"
    for r in range(a.repeats):
        for period in (1, a.period) if r % 2 == 0 else (a.period, 1):
            grid = tune.Tuner(trial, param_space={"iterations": a.iterations, "period": period, "size": a.size},
                              run_config=tune.RunConfig(name=f"p{period}_r{r}", storage_path=str(storage),
                                                        verbose=0)).fit()
            walls[period].append(grid[0].metrics["wall_s"])
    ray.shutdown()
    med = {k: statistics.median(v) for k, v in walls.items()}
    reports = {k: a.iterations // k + 1 for k in walls}
    per_report = (med[1] - med[a.period]) / (reports[1] - reports[a.period])
    out = {"iterations": a.iterations, "period": a.period, "size": a.size, "repeats": a.repeats,
           "wall_s": walls, "median_wall_s": med, "reports": reports, "cost_per_report_s": per_report,
           "step_s": med[a.period] / a.iterations}
    print(f"every 1: {med[1]:.2f} s for {reports[1]} reports; every {a.period}: {med[a.period]:.2f} s for "
          f"{reports[a.period]} reports (medians of {a.repeats}); cost per report {per_report * 1000:.1f} ms "
          f"= {per_report / out['step_s']:.2f} steps of {out['step_s'] * 1000:.1f} ms")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
