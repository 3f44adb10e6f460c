"""The main job: one of the paper's ablation tables (or your own search space) as a Ray Tune sweep.

    python jobs/ablation.py                       # Table 4 (k) over a few values, tiny preset, synthetic data
    python jobs/ablation.py --table k             # all of Table 4: k = 3, 5, ..., 19
    python jobs/ablation.py --table anchor_scale --values 6..9 --preset atss_r50 --data coco:/data/coco
    python jobs/ablation.py --space "k=5..15:2; scale~6..9" --num-samples 4 --asha
    python jobs/ablation.py --table backbone --device gpu --dry-run
    python jobs/ablation.py --table k --values 5,9 --amp bf16 --device gpu
    ray job submit --working-dir . -- python jobs/ablation.py --table k

A 1-worker trial trains inside its Tune trial, a multi-worker trial on Ray Train workers; each
trial is one MLflow child run under a parent run for the sweep. Tune's table shows each trial's
swept values, iteration, loss, images/s, AP and ETA, followed by the sweep's ETA. At the end the table (ours beside the paper's) is printed and written as Markdown and
Parquet with a PNG of AP against the swept value. ``--dry-run`` lists the trials without starting
anything (``--json``: each trial's full config, the one Tune carries and the trial trains, as one
JSON list on the last line). Re-running with the same ``--name`` (or ``--resume``) continues an
interrupted sweep.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Ray reads these when it is imported, so here. The trials print similar lines, which Ray's log
# deduplication would fold into one ("[repeated 2x across cluster]").
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Before torch loads OpenMP (here and in the local Ray cluster started from this process, whose workers
# inherit it): idle OpenMP threads sleep instead of spinning (docs/training.md, Throughput).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if not os.environ.get("RAY_ADDRESS"):
    # The local Ray cluster this job starts: token authentication, Ray's own default, but set
    # explicitly so Ray does not warn that it chose it.
    os.environ.setdefault("RAY_AUTH_MODE", "token")

from detector.fields import parse_assignments  # noqa: E402
from pipeline.cli import add_exit_codes, bad_input, run_main  # noqa: E402
from pipeline.data import AnnotationError, DataConfig  # noqa: E402

# The demo (no arguments): Table 4 at a few values of k. Measured on a 2-core CPU box in docs/ablation.md.
DEMO_TABLE = "k"
DEMO_VALUES = "5,9,13"
DEMO_ITERATIONS = 300
DEMO_BATCH_PER_WORKER = 8
# The 3 demo trials run together, each worker holding half a logical CPU: on 2 cores the three
# 1-thread workers keep both cores busy to the end (3 x W / 2), where 2-at-a-time leaves one core
# idle while the third trial runs alone (2 x W). Measured in docs/ablation.md.
DEMO_CPUS_PER_WORKER = 0.5
DEMO_BASE_LR = 0.02  # at the reference batch of 16; linear scaling makes it 0.01 at batch 8
# --smoke: two trials of a few iterations on tiny images (tests, the cluster end-to-end check).
SMOKE_VALUES = "5,9"
SMOKE_ITERATIONS = 4
SMOKE_DATA = dict(synthetic_train_images=16, synthetic_val_images=8, synthetic_image_size=(64, 96),
                  train_min_size=96, test_min_size=96, max_size=128)


def build_parser() -> argparse.ArgumentParser:
    from pipeline.ablation import TABLES

    tables = ", ".join(f"{n} (T{t.number})" for n, t in TABLES.items())
    p = argparse.ArgumentParser(
        prog="jobs/ablation.py", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="search space syntax: field=5,9,13 | field=5..15:2 (grid) ; field~6..9 | field~a,b (sampled); "
               "fields are DetectorConfig names (aliases k, scale, ratio); or a JSON/YAML file / inline JSON "
               "such as '{\"topk\": {\"randint\": [5, 15]}, \"num_samples\": 4}'. See docs/ablation.md.")
    what = p.add_argument_group("what to sweep")
    what.add_argument("--table", help=f"a paper table: {tables}")
    what.add_argument("--values", help="values of the table's swept field instead of the paper's, e.g. 5,9,13 or "
                                       "3..19:2 (k, anchor_scale, aspect_ratio tables)")
    what.add_argument("--rows", help="only these rows of the table (1-based positions or labels, comma-separated)")
    what.add_argument("--space", help="your own search space: compact syntax, inline JSON, or a .json/.yaml file")
    what.add_argument("--num-samples", type=int, help="draws of the sampled fields of --space (default 4)")
    what.add_argument("--sample-seed", type=int, default=0, help="seed of those draws (default 0)")
    what.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="a detector config field fixed on every trial (repeatable)")
    what.add_argument("--preset", default="tiny", help="detector size: a preset of that size family "
                      "(tiny: CPU sizes; atss_r50 etc.: the paper's R-50); default tiny")
    what.add_argument("--seeds", default="0", help="training seeds, each configuration runs once per seed "
                                                   "(e.g. 0,1,2); default 0")
    train = p.add_argument_group("training of each trial")
    train.add_argument("--data", default="synthetic", help="synthetic (default) or coco:/path/to/coco")
    train.add_argument("--iterations", type=int, help=f"iterations per trial (tiny presets: default {DEMO_ITERATIONS})")
    train.add_argument("--schedule", choices=("1x", "2x"), help="the paper's schedule instead (scaled to the batch; "
                                                                "default for the R-50 presets: 1x)")
    train.add_argument("--data-set", action="append", default=[], metavar="KEY=VALUE",
                       help="a DataConfig field, e.g. train_min_size=[640,800] (repeatable)")
    train.add_argument("--eval-period", type=int, help="evaluate every N iterations (default: at the end; "
                                                       "with --asha a quarter of the run)")
    train.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                       help="a TrainConfig field for every trial, e.g. base_lr=0.02 (repeatable)")
    train.add_argument("--amp", choices=("bf16",), help="train under bf16 autocast (default: fp32, as the paper; "
                                                        "evaluation always runs in fp32)")
    train.add_argument("--log-model", action="store_true", help="log each trial's model to MLflow")
    res = p.add_argument_group("resources")
    res.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"),
                     help="trial plans for CPU or GPU workers (auto: what the cluster declares or has)")
    res.add_argument("--workers-per-trial", type=int, help="Ray Train workers per trial (CPU default 1; GPU: "
                                                           "from the backbone, pipeline/resources.py)")
    res.add_argument("--cpus-per-worker", type=float, help="CPUs per Train worker")
    res.add_argument("--batch-per-worker", type=int,
                     help=f"images per worker per iteration (tiny default {DEMO_BATCH_PER_WORKER})")
    res.add_argument("--accelerator-type", help="Ray accelerator type for GPU workers (e.g. A100)")
    res.add_argument("--max-concurrent-trials", type=int, help="default: as many as the CPUs hold (CPU), "
                                                               "unbounded (GPU)")
    res.add_argument("--max-failures", type=int, default=0, help="restarts per trial, from its latest checkpoint (1-worker trials: "
                     "by Tune; multi-worker trials: by Ray Train); default 0")
    res.add_argument("--cluster", metavar="CLUSTER_YAML",
                     help="a cluster config (cluster/aws.yaml): every trial must fit one of its node types "
                          "(checked before anything starts); --dry-run also prints the node plan (peak nodes, "
                          "GPU-hours, cost). Implies --device gpu unless --device is given")
    res.add_argument("--node-price", action="append", default=[], metavar="TYPE=USD",
                     help="price per node-hour of a node type of --cluster (default: the config's "
                          "metadata.atss.price_per_node_hour); repeatable")
    sched = p.add_argument_group("scheduling")
    sched.add_argument("--asha", action="store_true", help="ASHA early stopping on validation AP")
    sched.add_argument("--asha-grace", type=int, help="iterations before ASHA may stop a trial "
                                                      "(default: the eval period)")
    out = p.add_argument_group("where results go")
    out.add_argument("--storage-path", help="absolute path (default ./ray_results)")
    out.add_argument("--mlflow-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or "
                                          "sqlite:///<cwd>/mlflow.db)")
    out.add_argument("--experiment", default=None, help="MLflow experiment (default atss-ablation)")
    out.add_argument("--name", help="sweep name; an existing one is resumed")
    out.add_argument("--resume", action="store_true", help="resume --name (default: the latest sweep)")
    mode = p.add_argument_group("modes")
    mode.add_argument("--dry-run", action="store_true", help="print the trials, configs and resources; start nothing")
    mode.add_argument("--json", action="store_true", help="also print the trials (dry run) or the results as "
                                                          "one JSON list on the last line")
    mode.add_argument("--smoke", action="store_true", help=f"2 trials (k={SMOKE_VALUES}), {SMOKE_ITERATIONS} "
                                                           "iterations on tiny images")
    mode.add_argument("--quiet", action="store_true", help="no Tune progress tables")
    return add_exit_codes(p, BAD_INPUT)


BAD_INPUT = """bad input (exit 2, all before Ray starts or an MLflow run is created): an unknown --table or row;
  an empty or malformed --space / --values; a value outside its field's type or range in --space, --values
  or --set; a --set of a field the table's rows set (it would be dropped); unknown or mistyped --set /
  --data-set / --train-set fields; --workers-per-trial < 1; bad --seeds; missing or unreadable data;
  nothing to --resume. A sweep whose trials all fail exits 1; an interrupted sweep exits 130."""


def _key_values(items: list[str], what: str) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what} {item!r}: write KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: give comma-separated integers") from None


def make_plan(a, config):
    """The SweepPlan the arguments describe, run as ``config`` says (raises ValueError naming the problem)."""
    from pipeline.ablation import SearchSpace, coerce_value, parse_space, plan_space, plan_table, resolve_field

    seeds = _seeds(a.seeds)
    fixed = _key_values(a.set, "--set")
    if a.space is not None and (a.table or a.values or a.rows):
        raise ValueError("give either --table (with --values/--rows) or --space, not both")
    if a.num_samples is not None and a.space is None:
        raise ValueError("--num-samples applies to --space only")
    if a.space is not None:  # '' is an empty space (an error), not the demo
        space = parse_space(a.space, a.num_samples)
        if fixed:
            extra = {resolve_field(k): coerce_value(resolve_field(k), v) for k, v in fixed.items()}
            clash = sorted(set(extra) & set(space.varied))
            if clash:
                raise ValueError(f"--set fixes {clash}, which the search space varies")
            space = SearchSpace(space.dimensions, {**space.fixed, **extra}, space.num_samples)
        return plan_space(space, a.preset, seeds, sample_seed=a.sample_seed, config=config)
    table = a.table or DEMO_TABLE
    values = a.values
    if a.table is None and not a.rows:
        values = values or (SMOKE_VALUES if a.smoke else DEMO_VALUES)
    elif a.smoke and values is None and a.rows is None:
        raise ValueError("--smoke runs 2 trials: with --table also give --values or --rows")
    return plan_table(table, a.preset, values=values, rows=a.rows, seeds=seeds, overrides=fixed, config=config)


def make_sweep_config(a):
    """The SweepConfig of the arguments: where results go, how long and on what each trial trains."""
    from pipeline.ablation import DEFAULT_EXPERIMENT, SweepConfig
    from pipeline.training import build_train_config, is_tiny

    if a.data == "synthetic":
        data = {}
    elif a.data.startswith("coco:") and len(a.data) > 5:
        data = {"source": a.data}
    else:
        raise ValueError(f"--data {a.data!r}: use synthetic or coco:/path/to/coco")
    train = parse_assignments(build_train_config, a.train_set, "--train-set")
    data.update(parse_assignments(DataConfig, a.data_set, "--data-set"))
    if a.iterations is not None and a.schedule is not None:
        raise ValueError("give either --iterations or --schedule, not both")
    tiny = is_tiny(a.preset)
    iterations = a.iterations
    if iterations is None and a.schedule is None and (tiny or a.smoke):
        iterations = SMOKE_ITERATIONS if a.smoke else DEMO_ITERATIONS
    if tiny:
        # the training job's CPU recipe for tiny detectors (jobs/train.py TINY_DEFAULTS)
        train = {"base_lr": DEMO_BASE_LR, **train}
    if a.smoke:
        data = {**SMOKE_DATA, **data}
        train = {"log_period": 1, **train}
    batch = a.batch_per_worker or ((2 if a.smoke else DEMO_BATCH_PER_WORKER) if tiny and a.device != "gpu" else None)
    cpus = a.cpus_per_worker
    if cpus is None and a.table is None and a.space is None and not a.smoke and a.device != "gpu":
        cpus = DEMO_CPUS_PER_WORKER
    config = SweepConfig(name=a.name, storage_path=a.storage_path, mlflow_uri=a.mlflow_uri,
                         experiment=a.experiment or DEFAULT_EXPERIMENT, iterations=iterations, schedule=a.schedule,
                         data=data, train=train, amp=a.amp,
                         device="gpu" if a.cluster and a.device == "auto" else a.device,
                         workers_per_trial=a.workers_per_trial,
                         cpus_per_worker=cpus, batch_per_worker=batch, accelerator_type=a.accelerator_type,
                         max_concurrent_trials=a.max_concurrent_trials, max_failures=a.max_failures, asha=a.asha,
                         asha_grace_period=a.asha_grace, eval_period=a.eval_period, log_model=a.log_model,
                         verbose=0 if a.quiet else 1)
    return config.resolve_paths()


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    from pipeline.ablation import describe

    with bad_input(ValueError, FileNotFoundError):
        config = make_sweep_config(a)
        cluster = None
        if a.cluster:
            from pipeline.cluster import ClusterSpec, parse_node_prices, sweep_node_plan

            cluster = ClusterSpec.from_yaml(a.cluster, prices=parse_node_prices(a.node_price))
        elif a.node_price:
            raise ValueError("--node-price needs --cluster")
        if a.dry_run:
            plan = make_plan(a, config)
            from pipeline.ablation import sweep

            sweep.check_data(plan)  # what the real run checks before Ray starts (annotation files parse)
            print(describe(plan))
            if cluster is not None:
                print()
                print(sweep_node_plan(plan.trials, cluster, config.max_concurrent_trials).render())
            if a.json:
                print(json.dumps([t.to_dict() for t in plan.trials]))
            return 0
        from pipeline.ablation import sweep

        if a.resume and not a.name:
            latest = sweep.find_latest_sweep(config.storage_path)
            if latest is None:
                raise ValueError(f"--resume: no sweep found under {config.storage_path}; give --name")
            config = config.replace(name=latest)
            print(f"[sweep] resuming the latest sweep: {latest}")
        plan = sweep.load_plan(config)  # a sweep of that name ran before: it resumes as planned then
        if plan is None:
            if a.resume:
                raise FileNotFoundError(f"nothing to resume: no sweep named {config.name!r} under "
                                        f"{config.storage_path}")
            plan = make_plan(a, config)
        else:
            print(f"[sweep] {plan.name}: resuming the stored plan ({plan.title}, {len(plan.trials)} trials); "
                  "the table/values given now are ignored")
        if cluster is not None:  # a trial no node type holds would stay pending forever
            sweep_node_plan(plan.trials, cluster, config.max_concurrent_trials)
        sweep.check_data(plan)

    import ray

    started_here = not ray.is_initialized()
    t0 = time.perf_counter()
    result = sweep.run_sweep(plan)
    if started_here:
        # Workers' log lines still in flight would otherwise land after the table.
        time.sleep(1.0)
        ray.shutdown()
    print(sweep.format_summary(result))
    print(f"total wall time {time.perf_counter() - t0:.0f} s")
    if a.json:
        print(result.table.to_json(orient="records"))
    status = result.table["status"]
    if status.isin(("interrupted", "missing")).any():
        return 130  # interrupted: the same --name resumes it
    return 0 if (status == "done").any() else 1


if __name__ == "__main__":
    run_main(main, errors=(AnnotationError,))
