"""The paper's tables expand into the configurations they claim; search spaces parse or fail clearly;
results tables put ours beside the paper's. No Ray here (see test_sweep.py)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import subprocess
from pathlib import Path

import pytest

from detector.config import get_preset
from pipeline import ablation as ab
from pipeline.ablation import report
from pipeline.cli import call_main
from pipeline.data.config import DataConfig
from pipeline.environment import DataFingerprint, Environment
from pipeline.verdict import Verdict

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ablation_job", REPO / "jobs" / "ablation.py")
ablation_job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablation_job)


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------
def test_table4_is_k_3_to_19_on_atss():
    plan = ab.plan_table("k", "tiny")
    assert [t.detector.topk for t in plan.trials] == [3, 5, 7, 9, 11, 13, 15, 17, 19]
    assert {t.preset for t in plan.trials} == {"atss_tiny"}
    assert plan.varied == ("topk",)
    assert [t.paper["AP"] for t in plan.trials] == [38.0, 38.8, 39.1, 39.3, 39.1, 39.0, 39.1, 39.2, 38.9]
    # everything but k is the preset (with the synthetic data's 5 categories)
    base = get_preset("atss_tiny", num_classes=5).to_dict()
    for t in plan.trials:
        diff = {k for k, v in t.detector.to_dict().items() if v != base[k]}
        assert diff <= {"topk"}


def test_table7_anchor_counts_and_assigners():
    plan = ab.plan_table("anchors_per_location", "tiny")
    assert [t.detector.anchors_per_location for t in plan.trials] == [9, 9, 9, 3, 3, 1]
    assert [t.detector.assigner for t in plan.trials] == ["max_iou", "max_iou", "atss", "atss", "atss", "atss"]
    sc_ar = [(t.detector.scales_per_octave, len(t.detector.aspect_ratios)) for t in plan.trials]
    assert sc_ar == [(3, 3), (3, 3), (3, 3), (3, 1), (1, 3), (1, 1)]
    # row 1 is plain RetinaNet; the rest carry all of Table 1's improvements
    first, second = plan.trials[0].detector, plan.trials[1].detector
    assert not (first.group_norm or first.centerness or first.scalar or first.in_gt_box)
    assert first.reg_loss == "smooth_l1"
    assert second.group_norm and second.centerness and second.scalar and second.in_gt_box
    assert second.reg_loss == "giou"
    # the last row is exactly the final ATSS model (same numbers as Table 5's 8S row)
    last = plan.trials[-1]
    atss = get_preset("atss_tiny", num_classes=5)
    assert {k: v for k, v in last.detector.to_dict().items() if v != atss.to_dict()[k]} == {}
    assert last.paper == ab.get_table("anchor_scale").row("8S").paper


def test_table1_adds_one_switch_per_row():
    plan = ab.plan_table("inconsistencies", "r50")
    retina = [t.detector for t in plan.trials[:6]]
    switches = ("group_norm", "reg_loss", "in_gt_box", "centerness", "scalar")
    on = [[getattr(c, s) == ("giou" if s == "reg_loss" else True) for s in switches] for c in retina]
    assert on == [[j < i for j in range(5)] for i in range(6)]
    assert all(c.anchors_per_location == 1 and c.assigner == "max_iou" and c.anchor_scale == 8 for c in retina)
    fcos = plan.trials[6].detector
    assert (fcos.assigner, fcos.regression, fcos.backbone) == ("spatial_scale", "point", "resnet50")
    assert [t.paper["AP"] for t in plan.trials] == [32.5, 33.4, 34.9, 35.3, 36.8, 37.0, 37.8]


def test_tables_2_3_5_6_8():
    t2 = ab.plan_table("positive_definition", "tiny")
    assert [(t.detector.assigner, t.detector.regression) for t in t2.trials] == [
        ("max_iou", "box"), ("max_iou", "point"), ("spatial_scale", "box"), ("spatial_scale", "point")]
    t3 = ab.plan_table("atss_vs_baselines", "tiny")
    assert [(t.detector.assigner, t.detector.regression, t.detector.center_sampling) for t in t3.trials] == [
        ("max_iou", "box", False), ("atss", "box", False), ("spatial_scale", "point", False),
        ("spatial_scale", "point", True), ("atss", "point", False)]
    assert all(len(t.paper) == 6 for t in t3.trials)
    t5 = ab.plan_table("anchor_scale", "tiny")
    assert [t.detector.anchor_scale for t in t5.trials] == [5, 6, 7, 8, 9]
    t6 = ab.plan_table("aspect_ratio", "tiny")
    assert [t.detector.aspect_ratios for t in t6.trials] == [(0.25,), (0.5,), (1.0,), (2.0,), (4.0,)]
    assert [t.label for t in t6.trials] == ["1:4", "1:2", "1:1", "2:1", "4:1"]
    t8 = ab.plan_table("backbone", "tiny")
    assert [(t.detector.backbone, t.detector.dcn_stages) for t in t8.trials] == [
        ("resnet101", ()), ("resnext101_32x8d", ()), ("resnext101_64x4d", ()),
        ("resnet101", (3, 4, 5)), ("resnext101_32x8d", (4, 5)), ("resnext101_64x4d", (4, 5))]
    assert t8.split == "test-dev" and t8.trials[0].paper["AP"] == 43.6


def test_every_table_on_both_sizes_has_paper_numbers():
    for name, table in ab.TABLES.items():
        for preset in ("tiny", "atss_r50"):
            plan = ab.plan_table(name, preset)
            assert len(plan.trials) == len(table.rows)
            assert all("AP" in t.paper for t in plan.trials)
            want = "tiny" if preset == "tiny" else "r50"
            assert all(t.preset.endswith(want) for t in plan.trials)
            if name != "backbone":  # the backbone rows keep their backbone on every size
                assert {t.detector.backbone for t in plan.trials} == {"resnet18" if want == "tiny" else "resnet50"}
        assert ab.get_table(f"T{table.number}") is table


def test_values_rows_and_seeds():
    plan = ab.plan_table("k", "tiny", values="5..9:2,13", seeds=[0, 1])
    assert [(t.detector.topk, t.seed) for t in plan.trials] == [(5, 0), (5, 1), (7, 0), (7, 1), (9, 0), (9, 1), (13, 0),
                                                               (13, 1)]
    assert len({t.name for t in plan.trials}) == 8
    plan = ab.plan_table("k", "tiny", values="4,9")
    assert [t.paper.get("AP") for t in plan.trials] == [None, 39.3]  # the paper has no k=4
    plan = ab.plan_table("aspect_ratio", "tiny", values="1:3,2:1")
    assert [t.detector.aspect_ratios for t in plan.trials] == [(1 / 3,), (2.0,)]
    plan = ab.plan_table("anchors_per_location", "tiny", rows="1,+Imprs.+ATSS #sc=1 #ar=1")
    assert [t.detector.anchors_per_location for t in plan.trials] == [9, 1]


@pytest.mark.parametrize("call, message", [
    (lambda: ab.plan_table("k7"), "unknown table 'k7'"),
    (lambda: ab.plan_table("k", values="5,x"), "bad value 'x' for 'topk'"),
    (lambda: ab.plan_table("k", values="9..3"), "empty range"),
    (lambda: ab.plan_table("k", values="0"), "topk=0: expected an int >= 1"),
    (lambda: ab.plan_table("anchor_scale", values="6,big"), "'big' is not a number"),
    (lambda: ab.plan_table("inconsistencies", values="1"), "no single swept field"),
    (lambda: ab.plan_table("k", rows="12"), "rows 1..9"),
    (lambda: ab.plan_table("k", preset="atss_r5O"), "unknown detector preset"),
    (lambda: ab.plan_table("k", seeds=[0, 0]), "seeds repeat"),
    (lambda: ab.plan_space("topkk=5,9"), "unknown detector config field 'topkk'"),
    (lambda: ab.plan_space("k=5,nine"), "'nine' is not an integer"),
    (lambda: ab.plan_space("regression=point; scales_per_octave=1,3"), "is impossible"),
    (lambda: ab.plan_space("group_norm=maybe,true"), "expected true/false"),
    (lambda: ab.plan_space({"topk": {"normal": [9, 2]}}), "unknown search space kind 'normal'"),
    (lambda: ab.plan_space({"anchor_scale": {"randint": [6, 9]}}), "'randint' needs an integer field"),
    (lambda: ab.plan_space("k=9"), "varies nothing"),
    (lambda: ab.plan_space("{not json"), "not valid JSON"),
    (lambda: ab.plan_space("/nope/space.yaml"), "file not found"),
])
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(ValueError, match=None) as info:
        call()
    assert message in str(info.value)


# ----------------------------------------------------------------------------------------------
# search spaces
# ----------------------------------------------------------------------------------------------
def test_compact_grid_and_samples():
    plan = ab.plan_space("k=5..15:5; scale=6,8; group_norm=false")
    assert [(t.detector.topk, t.detector.anchor_scale) for t in plan.trials] == [
        (5, 6.0), (5, 8.0), (10, 6.0), (10, 8.0), (15, 6.0), (15, 8.0)]
    assert all(not t.detector.group_norm for t in plan.trials)
    assert plan.varied == ("anchor_scale", "topk") or set(plan.varied) == {"anchor_scale", "topk"}
    sampled = ab.plan_space("k~5..15; scale~6..9", num_samples=5, sample_seed=3)
    again = ab.plan_space("k~5..15; scale~6..9", num_samples=5, sample_seed=3)
    assert [t.to_dict() for t in sampled.trials] == [t.to_dict() for t in again.trials]  # dry run == real run
    assert len(sampled.trials) == 5
    assert all(5 <= t.detector.topk <= 15 and 6 <= t.detector.anchor_scale <= 9 for t in sampled.trials)
    assert len({t.label for t in sampled.trials}) == 5


def test_json_and_yaml_spaces(tmp_path):
    inline = '{"topk": {"range": [7, 11, 2]}, "aspect_ratios": [[1.0], [0.5, 1.0, 2.0]]}'
    plan = ab.plan_space(inline)
    assert [(t.detector.topk, t.detector.anchors_per_location) for t in plan.trials] == [
        (7, 1), (7, 3), (9, 1), (9, 3), (11, 1), (11, 3)]
    path = tmp_path / "space.yaml"
    path.write_text("space:\n  k: {randint: [5, 15]}\n  anchor_scale: {uniform: [6, 9]}\nnum_samples: 3\n")
    plan = ab.plan_space(str(path))
    assert len(plan.trials) == 3
    # a custom sweep of one paper axis gets the paper's numbers where they exist
    plan = ab.plan_space("k=9,10")
    assert [t.paper.get("AP") for t in plan.trials] == [39.3, None]


def test_trial_specs_round_trip_json():
    plan = ab.plan_table("anchors_per_location", "tiny", seeds=[0, 2])
    again = ab.SweepPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------
def test_results_table_ours_beside_paper(tmp_path):
    plan = ab.plan_table("anchor_scale", "tiny", values="6,8,10")
    results = {0: {"AP": 0.25, "AP50": 0.5, "AP75": 0.2, "APs": 0.1, "APm": 0.3, "APl": -1.0},
               1: {"AP": 0.3, "AP50": 0.55, "AP75": 0.25, "APs": 0.15, "APm": 0.35, "APl": 0.4}}
    df = ab.results_frame(plan, results)
    assert list(df["label"]) == ["6S", "8S", "10S"]
    assert list(df["status"]) == ["done", "done", "missing"]
    assert df.loc[0, "AP"] == pytest.approx(25.0) and df.loc[0, "paper_AP"] == 39.2
    assert df.loc[0, "diff_AP"] == pytest.approx(25.0 - 39.2)
    assert math.isnan(df.loc[0, "APl"])  # COCO's -1 (no large objects) is not a number to compare
    assert df.loc[1, "diff_APl"] == pytest.approx(40.0 - 51.3)
    assert math.isnan(df.loc[2, "paper_AP"]) and math.isnan(df.loc[2, "AP"])  # 10S: no paper row, not run
    md = ab.format_table(plan, df)
    assert "| 8S | ours | 30.0 | 55.0 | 25.0 | 15.0 | 35.0 | 40.0 |" in md
    assert "|  | paper (minival) | 39.3 | 57.5 | 42.8 | 24.3 | 43.3 | 51.3 |" in md
    # synthetic shapes against the paper's COCO: no difference row, and the table says why
    assert "| difference |" not in md and "ours on synthetic data: no difference row" in md
    md = ab.format_table(on_coco(plan), ab.results_frame(on_coco(plan), results))
    assert "| 8S | ours | 30.0 | 55.0 | 25.0 | 15.0 | 35.0 | 40.0 |" in md
    assert "|  | difference | -9.3 | -2.5 | -17.8 | -9.3 | -8.3 | -11.3 |" in md
    assert "|  | paper (minival) | 39.3 | 57.5 | 42.8 | 24.3 | 43.3 | 51.3 |" in md
    assert "no difference row" not in md
    png = ab.plot_results(plan, df, tmp_path / "ap.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    seeds = ab.plan_table("k", "tiny", values="5,9", seeds=[0, 1])
    df = ab.results_frame(seeds, {i: {"AP": 0.1 * (i + 1)} for i in range(4)})
    summary = ab.summarize_seeds(df)
    assert list(summary["AP"]) == pytest.approx([15.0, 35.0])
    assert list(summary["seeds"]) == [2, 2]
    ab.plot_results(seeds, df, tmp_path / "seeds.png")


def on_coco(plan, data=None):
    """The same plan evaluated on COCO (the data is only named: the table reads its source)."""
    data = data or DataConfig(source="coco:/data/coco")
    return dataclasses.replace(plan, trials=tuple(dataclasses.replace(t, train=t.train.replace(data=data))
                                                  for t in plan.trials))


def seeded_results(plan, ap):
    """``{trial index: metrics}`` from ``ap[label][seed]`` (percent; None = the trial failed)."""
    out = {}
    for t in plan.trials:
        v = ap[t.label][t.seed]
        out[t.index] = {"status": "error", "error": "RuntimeError: boom"} if v is None else {"AP": v / 100}
    return out


def test_coco_data_is_a_coco_root_or_coco_named_files():
    plan = ab.plan_table("k", "tiny", values="5,9")
    assert not report.coco_data(plan)
    assert report.coco_data(on_coco(plan))
    assert report.coco_data(on_coco(plan, DataConfig(source="files", val_ann="/d/instances_val2017.json")))
    assert not report.coco_data(on_coco(plan, DataConfig(source="files", val_ann="/d/my_val.json")))


def test_seed_table_shows_mean_sd_and_the_paired_verdict_on_the_papers_claim():
    plan = ab.plan_table("k", "tiny", values="5,9,13", seeds=[0, 1, 2])
    # k=13 is 0.4 below the rows' mean in every seed: flat (band ±0.5) in every seed
    flat = {"k=5": [30.0, 27.0, 33.0], "k=9": [30.4, 27.4, 33.4], "k=13": [29.8, 26.8, 32.8]}
    df = ab.results_frame(plan, seeded_results(plan, flat))
    md = ab.format_table(plan, df)
    assert "| k=5 | ours, mean ± sd | 30.0 ± 3.0 | - | - | - | - | - | 30.0 / 27.0 / 33.0 |" in md
    assert "|  | paper (minival) | 38.8 | - | - | - | - | - |  |" in md
    assert "| difference |" not in md
    assert "T4 AP flat in k (k >= 5, ±0.5 AP): holds in every seed" in md and "in 3/3 seeds" in md
    assert "mean ± sample sd over seeds 0, 1, 2" in md
    # seed 1 breaks the band but the means stay flat: it holds on the mean only
    mean_only = {**flat, "k=9": [30.0, 28.6, 33.0]}
    md = ab.format_table(plan, ab.results_frame(plan, seeded_results(plan, mean_only)))
    assert "holds on the mean only" in md and "in 2/3 seeds" in md and "seed 1: no" in md
    # k=9 is 2 AP above the others in every seed: it does not hold
    steep = {**flat, "k=9": [32.0, 29.0, 35.0]}
    judgement = report.table_claim(plan, ab.results_frame(plan, seeded_results(plan, steep)))
    assert judgement.verdict is Verdict.DOES_NOT_HOLD and judgement.seeds == (0, 1, 2)
    # a failed trial: its seed cannot be paired, the row says how many seeds finished
    failed = {**flat, "k=13": [29.8, None, 32.8]}
    df = ab.results_frame(plan, seeded_results(plan, failed))
    md = ab.format_table(plan, df)
    assert "| k=13 | ours, mean ± sd (2/3 seeds: error) | 31.3 ± 2.1 |" in md
    assert report.table_claim(plan, df).seeds == (0, 2)
    # on COCO the difference row is the mean's
    md = ab.format_table(on_coco(plan), ab.results_frame(on_coco(plan), seeded_results(plan, flat)))
    assert "|  | difference | -8.8 | - | - | - | - | - |  |" in md


def test_one_seed_cannot_tell_and_tables_without_a_claim_say_so():
    plan = ab.plan_table("k", "tiny", values="5,9,13")
    df = ab.results_frame(plan, {0: {"AP": 0.30}, 1: {"AP": 0.304}, 2: {"AP": 0.298}})
    md = ab.format_table(plan, df)
    assert "| k=9 | ours | 30.4 | - | - | - | - | - |" in md and "AP per seed" not in md
    assert "T4 AP flat in k (k >= 5, ±0.5 AP): cannot tell with one seed (in seed 0 it holds" in md
    assert report.table_claim(plan, df).verdict is Verdict.CANNOT_TELL
    # models that detect nothing (a smoke run) are flat in k without telling anything
    zeros = ab.results_frame(plan, {0: {"AP": 0.0}, 1: {"AP": 0.0}, 2: {"AP": 0.0}})
    assert "cannot tell (every AP is 0: the models detect nothing yet" in ab.format_table(plan, zeros)
    # Table 7: the ATSS rows (#A = 9, 3, 3, 1) are the claim's; the max-IoU rows are not
    t7 = ab.plan_table("anchors_per_location", "tiny", seeds=[0, 1])
    ap = {t.label: [20.0, 22.0] for t in t7.trials}
    ap[t7.trials[0].label] = [10.0, 12.0]  # RetinaNet far below: outside the claim
    judgement = report.table_claim(t7, ab.results_frame(t7, seeded_results(t7, ap)))
    assert judgement.verdict is Verdict.EVERY_SEED and len(judgement.claim.test.rows) == 4
    # Table 3: the paper's ordering; one pair reversed in one seed only
    t3 = ab.plan_table("atss_vs_baselines", "tiny", seeds=[0, 1])
    ranked = sorted(t3.labels, key=lambda lab: -next(t.paper["AP"] for t in t3.trials if t.label == lab))
    ap = {lab: [40.0 - 2 * i, 40.0 - 2 * i] for i, lab in enumerate(ranked)}
    ap[ranked[-1]] = [31.0, 35.0]  # the paper's worst row beats the one above it (34) in seed 1 only
    md = ab.format_table(t3, ab.results_frame(t3, seeded_results(t3, ap)))
    assert "T3 ordering as in the paper" in md and "holds on the mean only" in md
    # no claim tested for Table 6; one seed cannot tell noise from an effect
    t6 = ab.plan_table("aspect_ratio", "tiny", values="1:2,1:1")
    md = ab.format_table(t6, ab.results_frame(t6, {0: {"AP": 0.2}, 1: {"AP": 0.25}}))
    assert "none is tested for this table" in md and "with one seed the table cannot tell" in md


def environment(threads: int) -> Environment:
    return Environment(cpu="AMD EPYC 7B13 (cpu family 25, model 1, stepping 0)", cpu_flags=("avx2", "fma"),
                       cpu_capability="AVX2", cpus=2, gpu=None, torch="2.14.1", torchvision="0.29.1", cuda=None,
                       cudnn=None, python="3.11.9", threads=threads, interop_threads=1, deterministic=True,
                       cudnn_deterministic=False, cudnn_benchmark=False,
                       data=DataFingerprint("synthetic", "0123456789abcdef", "synthetic generator v3, seed 0"))


def test_results_table_footer_records_the_environment():
    plan = ab.plan_table("k", "tiny", values="5,9")
    env = environment(1)
    df = ab.results_frame(plan, {0: {"AP": 0.3, "environment": env.key()}, 1: {"AP": 0.31}})
    assert list(df["environment"]) == [env.key(), ""]
    md = ab.format_table(plan, df, [env, env])
    assert md.rstrip().endswith(env.footer())
    assert "AMD EPYC 7B13" in md and "AVX2 kernels" in md and "1 thread per worker" in md
    assert "data: synthetic generator v3, seed 0" in md
    md = ab.format_table(plan, df, [env, environment(2)])
    assert "Rows come from 2 different environments" in md and "2 threads per worker" in md
    assert ab.format_table(plan, df).rstrip().endswith("Environment: not recorded")
    assert "environment" not in ab.summarize_seeds(df).columns


def test_sweep_parent_run_records_its_trials_environment(tmp_path):
    """The parent run reads each trial's environment from its child run (``env.json``) and records it:
    ``env.*`` params and tags when the trials share one, the footer naming each when they differ."""
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    from pipeline import tracking
    from pipeline.ablation import sweep  # imports Ray, starts nothing

    uri = (tmp_path / "mlruns").as_uri()  # the file store: no SQLite schema to create
    cfg = ab.SweepConfig(name="s", storage_path=str(tmp_path / "rr"), mlflow_uri=uri, experiment="e", iterations=4)
    client = MlflowClient(uri)
    parent = tracking.create_run(uri, "e", "s")
    for trial in ("t00_k=5_s0", "t01_k=9_s0"):
        child = tracking.create_run(uri, "e", trial, parent, {"ablation.trial": trial})
        client.log_batch(child, tags=[RunTag(k, v) for k, v in environment(1).to_tags().items()])
    tracking.create_run(uri, "e", "never trained", parent, {"ablation.trial": "t02_k=13_s0"})
    envs = sweep.trial_environments(cfg, parent)
    assert sorted(envs) == ["t00_k=5_s0", "t01_k=9_s0"] and {e.key() for e in envs.values()} == {environment(1).key()}
    sweep.record_environment(client, parent, envs, uri)
    run = client.get_run(parent)
    assert run.data.params["env.key"] == environment(1).key() and run.data.params["env.cpu_capability"] == "AVX2"
    assert run.data.tags["env.footer"] == environment(1).footer()
    sweep.record_environment(client, parent, {**envs, "t02_k=13_s0": environment(2)}, uri)
    run = client.get_run(parent)
    assert run.data.tags["env.footer"].startswith("Rows come from 2 different environments")
    assert run.data.params["env.key"] == environment(1).key()  # params keep their first value
    assert client.get_experiment_by_name("e").tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


# ----------------------------------------------------------------------------------------------
# the CLI (no Ray is started for a dry run or for bad arguments)
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def cli(tmp_path, capsys, monkeypatch):
    """Run the job's main() in this process, as `python jobs/ablation.py ARGS` would from ``tmp_path``."""
    import ray

    monkeypatch.chdir(tmp_path)

    def run(*args):
        # The session's Ray cluster may be up already when Ray tests ran first.
        was_up = ray.is_initialized()
        code = call_main(ablation_job.main, list(args))  # exit codes as `python jobs/ablation.py` gives them
        out = capsys.readouterr()
        assert ray.is_initialized() == was_up, "the job started Ray"
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run


def test_dry_run_json_lists_full_configs(tmp_path, cli):
    out = cli("--table", "anchors_per_location", "--dry-run", "--json")
    assert out.returncode == 0, out.stderr
    trials = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(trials) == 6
    assert [t["train"]["detector"]["scales_per_octave"] * len(t["train"]["detector"]["aspect_ratios"])
            for t in trials] == [9, 9, 9, 3, 3, 1]
    assert set(trials[0]["train"]["detector"]) == set(get_preset("tiny").to_dict())
    assert trials[0]["resources"]["num_workers"] == 1
    # the plan is what trains: the detector has the synthetic data's 5 categories, not COCO's 80
    assert {t["train"]["detector"]["num_classes"] for t in trials} == {5}
    assert [ab.TrialConfig.from_dict(t).to_dict() for t in trials] == trials  # what Tune carries round-trips
    assert "RetinaNet (#A=9)" in out.stdout
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()


def test_dry_run_default_is_the_demo_and_gpu_plans_come_from_the_backbone(tmp_path, cli):
    out = cli("--dry-run")
    assert out.returncode == 0, out.stderr
    assert "Table 4" in out.stdout and out.stdout.count("detector: atss_tiny + topk=") == 3
    out = cli("--table", "backbone", "--device", "gpu", "--dry-run", "--json")
    trials = json.loads(out.stdout.strip().splitlines()[-1])
    assert [t["resources"]["num_workers"] for t in trials] == [1, 8, 8, 8, 8, 8]
    assert ab.TrialConfig.from_dict(trials[3]).resources.resources_per_worker()["GPU"] == 1


@pytest.mark.parametrize("args, message", [
    (["--table", "kk"], "unknown table 'kk'"),
    (["--table", "k", "--values", "5,x"], "bad value 'x'"),
    (["--space", "topk=5,9; anchr_scale=6,8"], "unknown detector config field 'anchr_scale'"),
    (["--space", "regression=point; scales_per_octave=1,3"], "is impossible"),
    (["--table", "k", "--space", "k=5,9"], "not both"),
    (["--table", "k", "--values", "5,9", "--train-set", "base_lr=-1"], "base_lr must be > 0"),
    (["--data", "coco:/no/such/coco", "--values", "5"], "COCO root not found"),
    (["--resume", "--name", "never-ran"], "nothing to resume"),
])
def test_bad_arguments_fail_before_ray(tmp_path, cli, args, message):
    out = cli(*args, "--storage-path", str(tmp_path / "rr"))
    assert out.returncode == 2
    assert message in out.stderr
    assert "Ray" not in out.stderr and "ray.init" not in out.stderr
    assert not (tmp_path / "rr").exists()
