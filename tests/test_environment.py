"""pipeline.environment: what a run's numbers depend on, as recorded in MLflow and table footers."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pipeline.data import DataConfig
from pipeline.environment import (KERNEL_ENV_VARS, DataFingerprint, Environment, collect_environment,
                                  cpu_description, data_fingerprint, environment_footer)
from pipeline.synthetic import GENERATOR_VERSION, SyntheticSpec

X86 = {"vendor_id": "AuthenticAMD", "cpu family": "25", "model": "17", "model name": "AMD EPYC", "stepping": "1",
       "flags": "fpu sse4_2 avx fma avx2 avx512f avx512bw avx512_bf16 sha_ni"}
ARM = {"processor": "0", "Features": "fp asimd sve bf16", "CPU implementer": "0x41", "CPU part": "0xd40"}


def test_cpu_description_names_the_generation_and_the_vector_flags():
    model, flags = cpu_description(X86)
    assert model == "AMD EPYC (cpu family 25, model 17, stepping 1)"
    assert flags == ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16")  # no sha_ni, fpu
    model, flags = cpu_description(ARM)
    assert "part 0xd40" in model and flags == ("asimd", "sve", "bf16")


def test_collected_environment_is_this_process(monkeypatch):
    for name in KERNEL_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    torch.set_num_threads(1)
    env = collect_environment("cpu")
    assert env.torch == torch.__version__ and env.threads == 1 and env.gpu is None
    assert env.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert env.deterministic == torch.are_deterministic_algorithms_enabled()
    assert env.kernel_env == {} and env.data is None
    # what changes the numbers changes the key
    torch.set_num_threads(2)
    assert collect_environment("cpu").key() != env.key()
    torch.set_num_threads(1)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    forced = collect_environment("cpu")
    assert forced.kernel_env == {"ATEN_CPU_CAPABILITY": "avx2"} and forced.key() != env.key()
    assert "ATEN_CPU_CAPABILITY=avx2" in forced.footer()
    assert collect_environment("cpu").key() == forced.key()  # and nothing else does


def test_params_and_tags_are_mlflow_strings_and_round_trip():
    env = collect_environment("cpu", DataFingerprint.of_synthetic(SyntheticSpec(seed=3)))
    params, tags = env.to_params(), env.to_tags()
    for d in (params, tags):
        assert all(k.startswith("env.") and isinstance(v, str) and len(v) <= 6000 for k, v in d.items())
    assert params["env.key"] == env.key() and params["env.threads"] == str(env.threads)
    assert params["env.data"] == SyntheticSpec(seed=3).key()
    assert Environment.from_tags(tags) == env
    assert Environment.from_dict(json.loads(json.dumps(env.to_dict()))) == env
    with pytest.raises(KeyError, match="env.json"):
        Environment.from_tags({"mlflow.runName": "x"})


def test_synthetic_fingerprint_is_the_spec_not_the_images(tmp_path):
    cfg = DataConfig.tiny(cache_dir=str(tmp_path / "cache"))
    fp = data_fingerprint(cfg)
    assert fp.kind == "synthetic" and f"generator v{GENERATOR_VERSION}" in fp.detail and "seed 0" in fp.detail
    assert not (tmp_path / "cache").exists()  # nothing generated to fingerprint it
    assert data_fingerprint(cfg.replace(synthetic_seed=1)).digest != fp.digest
    assert data_fingerprint(cfg.replace(synthetic_train_images=301)).digest != fp.digest
    assert data_fingerprint(DataConfig.tiny(cache_dir=str(tmp_path / "other"))) == fp


def test_file_fingerprint_follows_the_annotation_bytes(tmp_path):
    train, val = tmp_path / "train.json", tmp_path / "val.json"
    train.write_text('{"images": []}')
    val.write_text('{"images": [1]}')
    cfg = DataConfig(source="files", train_ann=str(train), train_images=str(tmp_path),
                     val_ann=str(val), val_images=str(tmp_path))
    fp = data_fingerprint(cfg)
    assert fp.kind == "files" and "train train.json sha256:" in fp.detail and "val val.json" in fp.detail
    assert data_fingerprint(cfg) == fp
    val.write_text('{"images": [2]}')
    assert data_fingerprint(cfg).digest != fp.digest
    only_val = DataConfig(source="files", val_ann=str(val), val_images=str(tmp_path))
    assert "train" not in data_fingerprint(only_val).detail
    with pytest.raises(FileNotFoundError, match="split 'train'.*missing.json"):
        DataFingerprint.of_files({"train": tmp_path / "missing.json"})


@pytest.mark.coco
def test_coco_root_fingerprint_hashes_train_and_val(shared_data):
    fp = data_fingerprint(DataConfig(source=f"coco:{shared_data / 'coco_tiny'}"))
    assert "train instances_train2017.json" in fp.detail and "val instances_val2017.json" in fp.detail


def test_footer_is_one_line_and_names_differences():
    env = collect_environment("cpu", DataFingerprint.of_synthetic(SyntheticSpec()))
    line = env.footer()
    assert "\n" not in line
    for part in (env.cpu, env.cpu_capability, env.torch, env.torchvision, f"{env.threads} thread", env.data.detail):
        assert part in line
    assert environment_footer([env, env]) == line
    other = dataclasses.replace(env, threads=env.threads + 1)
    both = environment_footer([env, other, env])
    assert both.startswith("Rows come from 2 different environments") and both.count("\n- ") == 2
    assert environment_footer([]) == "Environment: not recorded"
