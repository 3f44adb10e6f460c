"""Training loop without Ray: config validation, exact resume, NaN guard, normaliser all-reduce, precision, COCO run."""
import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from mlflow import MlflowClient

from pipeline import checkpoint as ck
from pipeline.training import (NonFiniteLossError, TrainConfig, build_train_config, check_workers, run_training,
                               train_step)

REPO = Path(__file__).resolve().parents[1]
SMALL_DATA = dict(synthetic_train_images=32, synthetic_val_images=8, synthetic_image_size=[96, 128],
                  train_min_size=96, test_min_size=96, max_size=128)


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic_cache"))


def _cfg(tmp_path, data_cache, **kw):
    base = dict(preset="tiny", batch_size=2, iterations=6, checkpoint_period=2, log_period=2,
                eval_at_end=False, storage_path=str(tmp_path / "runs"), mlflow_enabled=False, torch_threads=1,
                data={**SMALL_DATA, "cache_dir": data_cache})
    base.update(kw)
    return build_train_config(**base)


# ---------------------------------------------------------------------------------------------
# configuration errors surface in the driver, before any worker exists
# ---------------------------------------------------------------------------------------------
def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(ValueError, match="unknown detector preset 'atss_r51'"):
        build_train_config(preset="atss_r51")
    with pytest.raises(ValueError, match="TrainConfig.detector: .*topkk"):
        build_train_config(detector={"topkk": 9})
    with pytest.raises(ValueError, match=r"TrainConfig.data: unknown key\(s\) \['min_size'\]"):
        build_train_config(data={"min_size": 800})
    with pytest.raises(ValueError, match="unknown schedule '3x'"):
        build_train_config(schedule="3x")
    with pytest.raises(ValueError, match="TrainConfig.amp='fp16': expected one of None, 'bf16'"):
        build_train_config(amp="fp16")
    with pytest.raises(ValueError, match="batch_size 6 .* not divisible by 4 workers"):
        check_workers(build_train_config(batch_size=6), num_workers=4)
    with pytest.raises(FileNotFoundError, match="COCO root not found: /nonexistent/coco"):
        build_train_config(data={"source": "coco:/nonexistent/coco"})
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="train annotation file not found: .*instances_train2017.json"):
        build_train_config(data={"source": f"coco:{tmp_path / 'coco'}"})


def test_build_train_config_makes_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = build_train_config(storage_path="rel/results", batch_size=4, cwd=tmp_path)
    assert cfg.storage_path == str(tmp_path.resolve() / "rel" / "results")
    assert cfg.mlflow.uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert cfg.run_name.startswith("atss_tiny_")
    assert build_train_config(storage_path="s3://b/x").storage_path == "s3://b/x"


def test_train_config_is_resolved_and_round_trips(tmp_path, data_cache):
    cfg = _cfg(tmp_path, data_cache, batch_size=4, iterations=None, schedule="1x", base_lr=0.02,
               detector={"topk": 5}, mlflow_enabled=True, mlflow_uri="mlruns", mlflow_tags={"k": 1})
    # num_classes from the data's categories (synthetic: 5), the schedule after linear scaling
    assert cfg.detector.num_classes == 5 and cfg.detector.topk == 5
    assert (cfg.schedule.max_iter, cfg.schedule.steps, cfg.schedule.base_lr) == (360_000, (240_000, 320_000), 0.005)
    assert cfg.data.synthetic_train_images == 32 and cfg.mlflow.tags == {"k": "1"}
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="num_classes=80 but the training data has 5 categories"):
        _cfg(tmp_path, data_cache, detector={"num_classes": 80})
    with pytest.raises(ValueError, match="TrainConfig.run_name 'a b'"):
        cfg.replace(run_name="a b")


def test_cli_rejects_a_bad_data_path_before_training(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_job", REPO / "jobs" / "train.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    from pipeline.cli import call_main

    assert call_main(job.main, ["--data", "coco:/no/such/coco", "--workers", "2"]) == 2
    assert "COCO root not found: /no/such/coco" in capsys.readouterr().err
    assert call_main(job.main, ["--batch-size", "4", "--batch-per-worker", "2"]) == 2
    assert "not both" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# exact resume, failure marking, NaN guard (plain process: the same loop Ray runs)
# ---------------------------------------------------------------------------------------------
def _weights(path):
    return ck.load_state(path)["model"]


def test_killed_run_resumes_at_the_exact_iteration_with_identical_weights(tmp_path, data_cache):
    store = (tmp_path / "mlruns").as_uri()
    ref = run_training(_cfg(tmp_path, data_cache, run_name="ref"), num_workers=0, verbose=False)
    assert ref.iteration == 6 and Path(ref.checkpoint_path).name == "checkpoint_000000006"

    crash = dict(run_name="crash", fail_at_iteration=3, mlflow_enabled=True, mlflow_uri=store)
    cfg = _cfg(tmp_path, data_cache, **crash)
    with pytest.raises(RuntimeError, match="injected failure at iteration 3"):
        run_training(cfg, num_workers=0, verbose=False)
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("atss").experiment_id])
    assert run.info.status == "FAILED" and "injected failure" in run.data.tags["error"]

    # re-submitting the same run name resumes from the checkpoint at iteration 2, in the same MLflow run
    again = run_training(cfg, num_workers=0, verbose=False)
    assert again.iteration == 6 and again.mlflow_run_id == run.info.run_id
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and "error" not in run.data.tags
    assert run.data.metrics["resumed_from_iteration"] == 2
    assert run.data.params["train.amp"] == "None"  # fp32 unless asked (issue 13)
    a, b = _weights(ref.checkpoint_path), _weights(again.checkpoint_path)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged from the uninterrupted one"
    kept = sorted(p.name for p in Path(again.run_dir).glob("checkpoint_*"))
    assert kept == ["checkpoint_000000004", "checkpoint_000000006"]  # checkpoints_to_keep=2

    # a finished run submitted again does nothing; a longer schedule with another LR continues it
    done = run_training(cfg, num_workers=0, verbose=False)
    assert done.iteration == 6 and done.metrics["iteration"] == 6 and done.checkpoint_path == again.checkpoint_path
    longer = run_training(_cfg(tmp_path, data_cache, **crash, iterations=8, lr_steps=[100], base_lr=0.08),
                          num_workers=0, verbose=False)
    assert longer.iteration == 8
    groups = ck.load_state(longer.checkpoint_path)["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([0.01, 0.02])  # 0.08 @ 16 -> 0.01 @ 2; biases x2
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["resumed_with.schedule.max_iter"] == "8" and tags["resumed_with.schedule.requested_lr"] == "0.08"
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        run_training(_cfg(tmp_path, data_cache, run_name="fresh"), num_workers=0, require_resume=True)


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, data_cache):
    # sane LR (1e9 x 1e-12) for the 2 warm-up iterations and the checkpoint at 2, then 1e9: divergence
    cfg = _cfg(tmp_path, data_cache, run_name="nan", base_lr=1e9, scale_lr=False, warmup_iters=2,
               warmup_factor=1e-12, iterations=40)
    with pytest.raises(NonFiniteLossError, match="non-finite (loss|gradient norm) at iteration") as info:
        run_training(cfg, num_workers=0, verbose=False)
    failed_at = int(str(info.value).split("at iteration ")[1].split()[0].rstrip(":"))
    ckpts = sorted(Path(tmp_path, "runs", "nan").glob("checkpoint_*"))
    assert ckpts, "no checkpoint before the failure"
    state = ck.load_state(ckpts[-1])
    assert state["iteration"] == 2 < failed_at
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    # the same config from the same checkpoint would only fail again: refused at once
    with pytest.raises(NonFiniteLossError, match="earlier attempt of this run; not retrying"):
        run_training(cfg, num_workers=0, verbose=False)


# ---------------------------------------------------------------------------------------------
# spec 3.6: 1 worker x 4 images == 2 workers x 2 images (normalisers all-reduced)
# ---------------------------------------------------------------------------------------------
def _batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 96, 128, generator=g)
    targets = []
    for i in range(4):  # different object counts per image, so the per-worker normalisers differ
        n = i + 1
        xy = torch.rand(n, 2, generator=g) * torch.tensor([80.0, 60.0])
        wh = 8 + torch.rand(n, 2, generator=g) * 40
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.arange(n) % 3 + 1})
    return images, targets


def _one_step(images, targets):
    from detector import build_detector, get_preset
    from pipeline.optim import WarmupMultiStepLR, build_optimizer
    from pipeline.schedule import resolve_schedule

    torch.manual_seed(0)
    # FrozenBN: trainable BatchNorm would see 2 vs 4 images (no SyncBN, as the paper)
    model = build_detector(get_preset("tiny", num_classes=3, frozen_bn=True))
    if torch.distributed.is_initialized():
        model = torch.nn.parallel.DistributedDataParallel(model)
    sched = resolve_schedule(4, None, iterations=10, warmup_iters=0)
    opt = build_optimizer(model, sched)
    out = train_step(model, opt, WarmupMultiStepLR(opt, sched), images, targets, iteration=0)
    params = torch.cat([p.detach().flatten() for p in ck.unwrap(model).parameters()])
    return out.losses, params


def _worker(rank, port, result_file):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    images, targets = _batch()
    losses, params = _one_step(images[2 * rank:2 * rank + 2], targets[2 * rank:2 * rank + 2])
    if rank == 0:
        torch.save({"losses": losses, "params": params}, result_file)
    torch.distributed.destroy_process_group()


def test_one_worker_batch4_equals_two_workers_batch2(tmp_path):
    torch.set_num_threads(1)
    single_losses, single_params = _one_step(*_batch())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the ranks inherit the imported modules (spawn re-imports torch and the detector, ~10 s each)
    mp.start_processes(_worker, args=(port, str(tmp_path / "r.pt")), nprocs=2, join=True, start_method="fork")
    dist = torch.load(tmp_path / "r.pt")
    for k, v in single_losses.items():
        assert dist["losses"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert torch.allclose(dist["params"], single_params, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# precision (issue 13): fp32 unless --amp bf16; recorded, printed; evaluation in fp32
# ---------------------------------------------------------------------------------------------
def test_training_is_fp32_by_default_and_bf16_only_when_asked(tmp_path, data_cache, capsys):
    from detector import build_detector, get_preset
    from pipeline.optim import WarmupMultiStepLR, build_optimizer
    from pipeline.schedule import resolve_schedule

    assert build_train_config().amp is None
    images, targets = _batch()
    torch.manual_seed(0)
    model = build_detector(get_preset("tiny", num_classes=3))
    seen = []
    model.head.register_forward_hook(lambda module, inputs, out: seen.append(out[0][0].dtype))  # P3 logits
    sched = resolve_schedule(2, None, iterations=10, warmup_iters=0)
    opt = build_optimizer(model, sched)
    for amp in (None, "bf16"):
        train_step(model, opt, WarmupMultiStepLR(opt, sched), images[:2], targets[:2], 0, amp=amp)
    assert seen == [torch.float32, torch.bfloat16]
    with pytest.raises(ValueError, match="amp must be None"):
        train_step(model, opt, WarmupMultiStepLR(opt, sched), images[:2], targets[:2], 0, amp=True)

    # the job: --amp bf16 is printed at start and recorded in MLflow; the evaluation after it runs
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_job", REPO / "jobs" / "train.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    store = (tmp_path / "mlruns").as_uri()
    data_opts = [f"{k}={json.dumps(v)}" for k, v in {**SMALL_DATA, "cache_dir": data_cache}.items()]
    argv = ["--workers", "0", "--batch-size", "2", "--iterations", "2", "--log-period", "1", "--name", "bf16",
            "--storage-path", str(tmp_path / "runs"), "--mlflow-uri", store, "--amp", "bf16",
            *[a for opt in data_opts for a in ("--data-opt", opt)]]
    assert job.main(argv) == 0
    out = capsys.readouterr().out
    assert "precision bf16 autocast (training only; evaluation in fp32)" in out and "COCO AP" in out
    (run,) = MlflowClient(store).search_runs([MlflowClient(store).get_experiment_by_name("atss").experiment_id])
    assert run.data.params["train.amp"] == "bf16" and run.info.status == "FINISHED"
    assert (tmp_path / "runs" / "bf16" / "eval" / "results_iter_000000002.json").is_file()


# ---------------------------------------------------------------------------------------------
# real COCO slice: train briefly, evaluate end to end on its val split
# ---------------------------------------------------------------------------------------------
@pytest.mark.coco
def test_short_run_on_coco_tiny_evaluates_end_to_end(tmp_path, shared_data):
    store = (tmp_path / "mlruns").as_uri()
    cfg = build_train_config(preset="tiny", batch_size=2, iterations=4, checkpoint_period=0, log_period=2,
                             storage_path=str(tmp_path / "runs"), run_name="coco_tiny", torch_threads=2,
                             mlflow_uri=store, eval_batch_size=8, log_model=False,  # the Ray test logs one
                             detector={"score_thresh": 0.001},  # a 4-iteration model scores low; keep its boxes
                             data={"source": f"coco:{shared_data / 'coco_tiny'}", "train_min_size": 96,
                                   "test_min_size": 96, "max_size": 160})
    res = run_training(cfg, num_workers=0, verbose=False)
    assert res.iteration == 4
    assert set(res.eval) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_category"}
    assert all(-1.0 <= res.eval[k] <= 1.0 for k in ("AP", "AP50"))
    gt = json.loads((shared_data / "coco_tiny/annotations/instances_val2017.json").read_text())
    results = json.loads(Path(res.run_dir, "eval", "results_iter_000000004.json").read_text())
    assert results, "no detections written"
    assert {d["category_id"] for d in results} <= {c["id"] for c in gt["categories"]}
    assert {d["image_id"] for d in results} <= {im["id"] for im in gt["images"]}
    # the final checkpoint carries the results and loads back as a detector with COCO's categories
    assert (Path(res.checkpoint_path) / "results.json").is_file()
    model, det_cfg, meta = ck.load_detector(res.checkpoint_path)
    assert det_cfg.num_classes == 80 and meta["iteration"] == 4
    assert [c["id"] for c in meta["categories"]] == sorted(c["id"] for c in gt["categories"])
    arts = {a.path for a in MlflowClient(store).list_artifacts(res.mlflow_run_id, "eval")}
    assert "eval/results_iter_000000004.json" in arts
