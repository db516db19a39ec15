"""The zoo end to end: every shipped config validates, every zoo model lists its layers and
gets adapters, and a published CIFAR-100 config runs through the real pipeline (on tiny
CIFAR-shaped data, one step per stage)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdistill.adapters import make_adapter
from kdistill.config import load_config
from kdistill.models import MODELS, build_model
from kdistill.taps import list_layers

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
ZOO = [m for m in MODELS if m not in ("classic_teacher", "classic_student", "classic_cnn", "mlp")]


def test_there_are_configs_for_both_pairs_and_every_method():
    cifar = [p for p in CONFIGS if p.parts[-3] == "cifar100"]
    methods = {p.parts[-2] for p in cifar}
    assert {"kd", "dkd", "dist", "logit_standard_kd", "reverse_kl", "js_divergence", "fitnets", "at", "nst", "vid",
            "ft", "sp", "rkd", "pkt", "cc", "crd"} <= methods
    for method in methods:
        names = {p.name for p in cifar if p.parts[-2] == method}
        assert names == {"resnet32x4_resnet8x4.yaml", "wrn_40_2_wrn_16_2.yaml"}, method


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(p.parents[2])) for p in CONFIGS])
def test_every_shipped_config_validates(path):
    config = load_config(path)
    if path.parts[-3] == "cifar100":  # the published recipe
        d = config.stages.distil
        assert d.epochs == 240 and d.optimizer.kwargs["lr"] == 0.05 and config.data.batch_size == 64
        assert d.schedule.kwargs["milestones"] == [150, 180, 210] and d.optimizer.kwargs["weight_decay"] == 5e-4
        assert d.temperature == 4.0


@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_model_lists_its_layers_and_gets_adapters(name):
    model = build_model(name, num_classes=100, in_channels=3, input_size=32)
    rows = {r["path"]: r for r in list_layers(model, torch.zeros(2, 3, 32, 32))}
    for path in (*model.feature_layers, model.penultimate_layer):
        assert path in rows, path
    # adapters from this model's last stage / penultimate vector to resnet32x4's
    last = rows[model.feature_layers[-1]]["output_shape"]
    adapter = make_adapter(last, [2, 256, 8, 8])
    assert adapter(torch.zeros(*last)).shape == (2, 256, 8, 8)
    vec = rows[model.penultimate_layer]["output_shape"]
    assert make_adapter(vec, [2, 256])(torch.zeros(*vec)).shape == (2, 256)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["crd", "fitnets", "dkd"])
def test_a_published_config_runs_the_real_pipeline(tmp_path, method):
    pytest.importorskip("sklearn")
    from kdistill.experiment import run_experiment

    path = next(p for p in CONFIGS if p.parts[-2] == method and p.name == "wrn_40_2_wrn_16_2.yaml")
    overrides = [
        "data.dataset=null", "data.reader={_component_: user_components.synthetic_rgb}", "data.batch_size=8",
        f"output_dir={tmp_path / 'run'}", "teacher_store=null", "threads=1",
        "report.repeats=3", "report.throughput_batch=4",
        *(f"stages.{s}.epochs=1" for s in ("teacher", "scratch", "distil")),
    ]
    if method == "crd":
        overrides.append("stages.distil.losses.0.n_data=16")
    config = load_config(path, overrides)
    metrics = run_experiment(config, verbose=0, log=lambda m: None)
    assert set(metrics["models"]) == {"teacher", "scratch", "distil"}
    assert metrics["models"]["distil"]["parameters"] == metrics["models"]["scratch"]["parameters"]
    hist = metrics["histories"]["distil"]["history"]
    assert len(hist["distillation_loss"]) == 1 and hist["distillation_loss"][0] == hist["distillation_loss"][0]  # finite
