"""Deep mutual learning: the loss against the paper's formula, the peers' updates,
checkpoint and resume (Python and YAML), and the config's refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crashing import Crash, CrashAt
from experiment_configs import tiny_config
from kdistill import MutualLearning, TrainingCheckpoint, mutual_loss
from kdistill.config import validate_config
from kdistill.errors import ConfigError
from kdistill.experiment import run_experiment


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per sample, written out."""
    return (p * (p.log() - q.log())).sum(-1)


def _reference(logits: torch.Tensor, t: float, target: str) -> torch.Tensor:
    """Zhang et al. 2018 eq. 10 (target "peers") and its ensemble-teacher variant, per peer."""
    k = logits.shape[0]
    p = torch.softmax(logits.double() / t, -1)
    out = []
    for i in range(k):
        others = [j for j in range(k) if j != i]
        if target == "peers":
            d = sum(_kl(p[j], p[i]).mean() for j in others) / (k - 1)
        else:
            d = _kl(torch.stack([p[j] for j in others]).mean(0), p[i]).mean()
        out.append(d * t * t)
    return torch.stack(out)


def _peers(k=2, seed=0, d=6, c=4):
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(d, 12), nn.ReLU(), nn.Linear(12, c)) for _ in range(k)]


def _data(n=48, d=6, c=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)


@pytest.mark.parametrize("target", ["peers", "ensemble"])
@pytest.mark.parametrize("t", [1.0, 3.0])
def test_mutual_loss_matches_the_formula(target, t):
    logits = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
    got = mutual_loss(logits, t, target=target)
    torch.testing.assert_close(got.double(), _reference(logits, t, target), rtol=1e-5, atol=1e-6)


def test_two_peers_the_targets_agree_and_gradients_reach_only_their_own_peer():
    logits = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(2), requires_grad=True)
    a, b = mutual_loss(logits, 2.0, target="peers"), mutual_loss(logits, 2.0, target="ensemble")
    torch.testing.assert_close(a, b)
    (g,) = torch.autograd.grad(a[0], logits)
    assert g[0].abs().sum() > 0 and g[1].abs().sum() == 0  # peer 2's prediction is peer 1's fixed target


def test_mutual_loss_refuses_one_peer_and_unknown_targets():
    with pytest.raises(ValueError, match=r"K >= 2"):
        mutual_loss(torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match="target must be one of"):
        mutual_loss(torch.randn(2, 3, 4), target="mean")


def test_a_step_logs_the_formula_and_updates_every_peer():
    peers = _peers(3)
    before = [[p.detach().clone() for p in peer.parameters()] for peer in peers]
    x, y = _data(16)
    dml = MutualLearning(peers, device="cpu")
    dml.compile("sgd", learning_rate=0.1, metrics=["accuracy"], alpha=0.3, temperature=2.0)
    from kdistill.outputs import Batch

    with torch.no_grad():
        z = torch.stack([peer(x) for peer in peers])
    logs = dml.train_step(Batch(x, y))
    mimic = _reference(z, 2.0, "peers")
    for k in range(3):
        ce = F.cross_entropy(z[k].double(), y)
        expected = 0.3 * ce + 0.7 * mimic[k]
        assert float(logs[f"peer{k + 1}_loss"]) == pytest.approx(float(expected), rel=1e-5)
        assert float(logs[f"peer{k + 1}_student_loss"]) == pytest.approx(float(ce), rel=1e-5)
    assert float(logs["loss"]) == pytest.approx(sum(float(logs[f"peer{k}_loss"]) for k in (1, 2, 3)) / 3, rel=1e-6)
    for peer, old in zip(peers, before):
        assert all(not torch.equal(p, o) for p, o in zip(peer.parameters(), old))


def test_each_peer_gets_the_gradient_of_its_own_loss():
    """One backward of the sum = each peer's own backward (the targets are detached)."""
    peers = _peers(2)
    x, y = _data(16)
    twins = _peers(2)  # same seed: same weights
    dml = MutualLearning(peers, device="cpu").compile("sgd", learning_rate=1.0, alpha=0.5, temperature=2.0)
    from kdistill.outputs import Batch

    dml.train_step(Batch(x, y))
    z = torch.stack([p(x) for p in twins])  # both peers' predictions before the step
    grads = []
    for k, twin in enumerate(twins):
        zk = torch.stack([z[j] if j == k else z[j].detach() for j in range(2)])
        loss = 0.5 * F.cross_entropy(zk[k], y) + 0.5 * mutual_loss(zk, 2.0)[k]
        grads.append(torch.autograd.grad(loss, list(twin.parameters()), retain_graph=True))
    for k, twin in enumerate(twins):
        with torch.no_grad():
            for p, g in zip(twin.parameters(), grads[k]):
                p -= g
        for got, want in zip(peers[k].parameters(), twin.parameters()):
            torch.testing.assert_close(got, want)


def test_evaluate_and_predict_give_every_peer():
    x, y = _data()
    dml = MutualLearning(_peers(2), device="cpu").compile(metrics=["accuracy"])
    dml.fit(x, y, epochs=1, batch_size=16, verbose=0, seed=0)
    result = dml.evaluate(x, y)
    assert {"peer1_accuracy", "peer2_accuracy", "accuracy", "peer1_loss", "peer2_loss"} <= set(result)
    assert result["accuracy"] == pytest.approx((result["peer1_accuracy"] + result["peer2_accuracy"]) / 2)
    assert dml.predict(x).shape == (2, len(x), 4)


def _fit(tmp_path, crash_at=None, resume=False):
    x, y = _data(64)
    dml = MutualLearning(_peers(2), device="cpu")
    dml.compile("adam", learning_rate=0.01, metrics=["accuracy"], alpha=0.5, temperature=2.0,
                scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, 0.5))
    state = tmp_path / "last.pt"
    cbs = [TrainingCheckpoint(state, every_steps=1)] + ([CrashAt(crash_at)] if crash_at else [])
    dml.fit(x, y, epochs=3, batch_size=16, verbose=0, seed=0, validation_data=(x, y), callbacks=cbs,
            resume_from=state if resume else None)
    return dml


def test_resume_in_the_middle_ends_bit_identical(tmp_path):
    reference = _fit(tmp_path / "a")
    with pytest.raises(Crash):
        _fit(tmp_path / "b", crash_at=6)  # in the second epoch (4 steps an epoch)
    state = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert len(state["optimizer"]["peers"]) == 2 and state["global_step"] == 6
    resumed = _fit(tmp_path / "b", resume=True)
    for a, b in zip(reference.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.history.history == reference.history.history


def test_refusals_name_the_value_and_the_fix():
    peers = _peers(2)
    with pytest.raises(ValueError, match="at least 2 peers"):
        MutualLearning(peers[:1])
    with pytest.raises(ValueError, match="the same network is given twice"):
        MutualLearning([peers[0], peers[0]])
    dml = MutualLearning(peers, device="cpu")
    with pytest.raises(ValueError, match="its own optimizer"):
        dml.compile(torch.optim.Adam([p for peer in peers for p in peer.parameters()]))
    with pytest.raises(ValueError, match="one torch.optim.Optimizer per peer"):
        dml.compile([torch.optim.Adam(peers[0].parameters())])
    with pytest.raises(ValueError, match="optimizer 1 must hold parameters of peer 1"):
        dml.compile([torch.optim.Adam(peers[1].parameters()), torch.optim.Adam(peers[0].parameters())])
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\].*1.5"):
        dml.compile(alpha=1.5)
    with pytest.raises(ValueError, match="max_grad_norm"):
        dml.compile(max_grad_norm=1.0)


# --------------------------------------------------------------------------- YAML

pytest.importorskip("sklearn")  # the tiny runs below read scikit-learn's digits

MUTUAL = {"peers": 2, "epochs": 2, "optimizer": {"name": "adam", "lr": 0.005}, "alpha": 0.5, "temperature": 2.0}


def _raw(out: Path, flag: Path | None = None, **mutual):
    raw = tiny_config(out, checkpoint={"every_steps": 1, "every_seconds": None})
    raw["stages"]["mutual"] = {**MUTUAL, **mutual}
    raw["callbacks"] = [{"_component_": "crashing.CrashInStage", "n": 30, "stage": "{stage}", "only": "mutual",
                         "flag": str(flag or out.parent / "no.flag")}]
    return raw


def test_the_mutual_stage_trains_every_peer_and_reports_each_against_scratch(tmp_path):
    out = tmp_path / "m"
    m = run_experiment(validate_config(_raw(out, peers=[{"name": "mlp", "hidden": [8]}, {"name": "mlp", "hidden": [16]}])),
                       verbose=0, log=lambda s: None)
    assert m["stages"][-2:] == ["mutual_1", "mutual_2"]
    assert m["models"]["mutual_1"]["parameters"] < m["models"]["mutual_2"]["parameters"]
    hist = m["histories"]["mutual"]["history"]
    assert len(hist["val_peer1_accuracy"]) == 2 and "peer2_distillation_loss" in hist
    report = (out / "report.md").read_text()
    assert "mutual peer 1" in report and "mutual peer 2" in report
    # the headline compares a peer with the scratch student when it is the same network
    assert "mutual peer 1 vs the same student trained alone" in report
    assert "mutual peer 2 vs the same student" not in report
    state = torch.load(out / "stages" / "mutual" / "checkpoint.pt", weights_only=False)["state_dict"]
    assert any(k.startswith("peers.1.") for k in state)
    from kdistill.experiment import load_stage_model

    peer2 = load_stage_model(out, "mutual_2")
    assert sum(p.numel() for p in peer2.parameters()) == m["models"]["mutual_2"]["parameters"]
    assert all(torch.equal(v, state[f"peers.1.{k}"]) for k, v in peer2.state_dict().items())


def test_the_mutual_stage_resumes_in_the_middle_bit_identical(tmp_path):
    reference = run_experiment(validate_config(_raw(tmp_path / "ref")), verbose=0, log=lambda s: None)
    out, flag = tmp_path / "crash", tmp_path / "crash.flag"
    flag.write_text("")
    raw = _raw(out, flag)
    with pytest.raises(Crash):
        run_experiment(validate_config(raw), verbose=0, log=lambda s: None)
    assert not (out / "stages" / "mutual" / "done.json").exists()
    assert torch.load(out / "stages" / "mutual" / "last.pt", weights_only=False)["global_step"] == 30
    logs: list[str] = []
    again = run_experiment(validate_config(raw), verbose=0, log=logs.append)
    assert any("[mutual] resuming" in line for line in logs)
    assert not any(line.endswith("] training") for line in logs)  # the finished stages are not trained again
    for k in ("mutual_1", "mutual_2"):
        assert again["models"][k]["test_accuracy"] == reference["models"][k]["test_accuracy"]
    a = torch.load(tmp_path / "ref" / "stages" / "mutual" / "checkpoint.pt", weights_only=False)["state_dict"]
    b = torch.load(out / "stages" / "mutual" / "checkpoint.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again["histories"]["mutual"]["history"] == reference["histories"]["mutual"]["history"]


@pytest.mark.parametrize("mutual, message", [
    ({"peers": 1}, "at least 2 peers"),
    ({"peers": [{"name": "mlp"}]}, "lists 1 model"),
    ({"max_grad_norm": 1.0}, "max_grad_norm is not supported"),
    ({"target": "mean"}, "target"),
])
def test_config_refusals(tmp_path, mutual, message):
    raw = tiny_config(tmp_path)
    raw["stages"]["mutual"] = {**MUTUAL, **mutual}
    with pytest.raises(ConfigError, match=message):
        validate_config(raw)
