"""Hidden-state distillation for language models: the decoder layers found on tiny Llama and
GPT-2 models, TinyBERT's uniform layer mapping, the masked distance against an independent
float64 computation (padding must not count), the projections (shapes, trained with the
student) and a Distiller fit with a logit loss and hidden-state losses over a mapping."""

from __future__ import annotations

import math
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from kdistill import Distiller  # noqa: E402
from kdistill.losses import (  # noqa: E402
    HiddenStateLoss,
    KDLoss,
    WeightedSum,
    decoder_layer_paths,
    hidden_state_loss,
    hidden_state_losses,
    hidden_state_mask,
    layer_mapping,
)
from kdistill.outputs import Batch, Outputs, next_token_targets  # noqa: E402
from kdistill.taps import FeatureTaps  # noqa: E402

VOCAB = 64


# --------------------------------------------------------------------------- helpers


def llama(hidden: int, layers: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def gpt2(hidden: int, layers: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


def token_batch(b: int = 4, t: int = 8, seed: int = 0, pad: int = 3) -> Batch:
    """Right-padded token batch: the first sequence ends ``pad`` positions early."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    attention = torch.ones(b, t, dtype=torch.long)
    attention[0, t - pad:] = 0
    labels = ids.masked_fill(attention == 0, -100)
    return Batch({"input_ids": ids, "attention_mask": attention}, next_token_targets(labels))


def reference_mse(s: np.ndarray, t: np.ndarray, mask: np.ndarray) -> float:
    """sum over valid (b, t) of mean_d (s - t)^2, divided by the valid count: loops in float64."""
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for p in range(s.shape[1]):
            if mask[b, p]:
                total += float(np.mean((s[b, p].astype(np.float64) - t[b, p].astype(np.float64)) ** 2))
                count += 1
    return total / count


def reference_cosine(s: np.ndarray, t: np.ndarray, mask: np.ndarray) -> float:
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for p in range(s.shape[1]):
            if mask[b, p]:
                u, v = s[b, p].astype(np.float64), t[b, p].astype(np.float64)
                total += 1.0 - float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
                count += 1
    return total / count


def reference_layer_norm(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    x = x.astype(np.float64)
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def padded_states(seed: int = 0, b: int = 3, t: int = 5, d: int = 6):
    g = torch.Generator().manual_seed(seed)
    s, te = torch.randn(b, t, d, generator=g), torch.randn(b, t, d, generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 4:] = False
    return s, te, mask


# --------------------------------------------------------------------------- decoder layers


def test_decoder_layer_paths_of_llama_and_gpt2():
    assert decoder_layer_paths(llama(32, 4)) == [f"model.layers.{i}" for i in range(4)]
    assert decoder_layer_paths(gpt2(32, 3)) == [f"transformer.h.{i}" for i in range(3)]


@pytest.mark.parametrize("make, n", [(lambda: llama(32, 3), 3), (lambda: gpt2(32, 3), 3)])
def test_a_tapped_decoder_layer_gives_its_hidden_state(make, n):
    # the taps keep the first tensor of a tuple output; either way the layer's output is
    # Hugging Face's hidden_states[i + 1] (the last one is before the final norm there)
    model = make().eval()
    paths = decoder_layer_paths(model)
    ids = torch.randint(0, VOCAB, (2, 6))
    with FeatureTaps(model, paths) as taps, torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    captured = taps.pop()
    for i, path in enumerate(paths):
        assert captured[path].shape == (2, 6, 32)
        if i < n - 1:
            torch.testing.assert_close(captured[path], out.hidden_states[i + 1])


def test_decoder_layer_paths_errors_name_what_exists():
    class NoConfig(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

    with pytest.raises(ValueError, match="no config.num_hidden_layers"):
        decoder_layer_paths(NoConfig())
    assert decoder_layer_paths(NoConfig(), num_layers=3) == ["blocks.0", "blocks.1", "blocks.2"]

    model = NoConfig()
    model.config = SimpleNamespace(num_hidden_layers=5)
    with pytest.raises(ValueError, match=r"no nn.ModuleList of 5 layers.*'blocks' \(3\)"):
        decoder_layer_paths(model)


def test_decoder_layer_paths_prefers_the_blocks_over_another_list_of_that_length():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(num_hidden_layers=2)
            self.heads = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
            self.body = nn.Module()
            self.body.layers = nn.ModuleList([nn.Linear(64, 64), nn.Linear(64, 64)])

    assert decoder_layer_paths(Model()) == ["body.layers.0", "body.layers.1"]


# --------------------------------------------------------------------------- layer mapping


def test_uniform_mapping_values():
    assert layer_mapping(2, 4) == {0: 1, 1: 3}
    assert layer_mapping(3, 12) == {0: 3, 1: 7, 2: 11}
    assert layer_mapping(3, 12, "all") == layer_mapping(3, 12, "uniform")
    assert layer_mapping(4, 4) == {0: 0, 1: 1, 2: 2, 3: 3}
    assert layer_mapping(4, 6) == {0: 1, 1: 2, 2: 4, 3: 5}  # 1.5 -> 2, 4.5 -> 5: halves round up
    assert layer_mapping(3, 1) == {0: 0, 1: 0, 2: 0}  # a student deeper than its teacher


@pytest.mark.parametrize("ls, lt", [(1, 1), (2, 4), (3, 12), (4, 6), (6, 24), (5, 7), (2, 3), (7, 32)])
def test_uniform_mapping_is_tinyberts_rule(ls, lt):
    pairs = layer_mapping(ls, lt)
    assert list(pairs) == list(range(ls))
    for i, j in pairs.items():
        # round((i + 1) * lt / ls) - 1 with exact fractions, halves up
        assert j == max(0, math.floor(Fraction((i + 1) * lt, ls) + Fraction(1, 2)) - 1)
        if lt % ls == 0:  # TinyBERT, 1-based: student layer m learns from teacher layer m * lt / ls
            assert j + 1 == (i + 1) * lt // ls
    assert pairs[ls - 1] == lt - 1  # last meets last
    assert all(a <= b for a, b in zip(list(pairs.values()), list(pairs.values())[1:]))


def test_last_and_explicit_mappings():
    assert layer_mapping(2, 4, "last") == {1: 3}
    assert layer_mapping(2, 4, [(0, 0), (1, 2)]) == {0: 0, 1: 2}
    assert layer_mapping(2, 4, [[1, 3]]) == {1: 3}  # YAML gives lists
    assert layer_mapping(2, 4, {0: 2}) == {0: 2}


@pytest.mark.parametrize("mapping, match", [
    ([(2, 1)], r"\(2, 1\) is out of range: the valid indices are student layers 0..1, teacher layers 0..3"),
    ([(0, 4)], r"student layers 0..1, teacher layers 0..3"),
    ([(-1, 0)], r"out of range"),
    ([(0, 1), (0, 2)], "student layer 0 is mapped twice"),
    ([(0, 1, 2)], "pair"),
    ([5], "pair"),
    ([(0.5, 1)], "integers"),
    ([], "no \\(student_layer, teacher_layer\\) pairs"),
    ("every", "must be one of"),
])
def test_mapping_errors(mapping, match):
    with pytest.raises(ValueError, match=match):
        layer_mapping(2, 4, mapping)


@pytest.mark.parametrize("ls, lt", [(0, 4), (2, 0), (True, 4), (2.0, 4)])
def test_layer_counts_must_be_positive_integers(ls, lt):
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        layer_mapping(ls, lt)


# --------------------------------------------------------------------------- the distance


def test_masked_mse_equals_an_independent_computation():
    s, t, mask = padded_states()
    got = hidden_state_loss(s, t, mask)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(reference_mse(s.numpy(), t.numpy(), mask.numpy()), rel=1e-6)
    # without a mask: the plain mean over every element
    torch.testing.assert_close(hidden_state_loss(s, t), nn.functional.mse_loss(s, t))


def test_padding_garbage_changes_neither_value_nor_gradient():
    s, t, mask = padded_states()
    clean = hidden_state_loss(s, t, mask, distance="mse")
    for distance, normalize in (("mse", False), ("mse", True), ("cosine", False), ("cosine", True)):
        expected = hidden_state_loss(s, t, mask, distance=distance, normalize=normalize)
        s2, t2 = s.clone(), t.clone()
        s2[~mask] = 1e6 * torch.randn_like(s2[~mask])
        t2[~mask] = float("nan")
        s2.requires_grad_(True)
        got = hidden_state_loss(s2, t2, mask, distance=distance, normalize=normalize)
        assert torch.isfinite(got)
        torch.testing.assert_close(got, expected)
        got.backward()
        assert torch.isfinite(s2.grad).all()
        assert (s2.grad[~mask] == 0).all() and (s2.grad[mask] != 0).any()
    assert clean.item() == pytest.approx(reference_mse(s.numpy(), t.numpy(), mask.numpy()), rel=1e-6)


def test_cosine_and_normalized_equal_independent_computations():
    s, t, mask = padded_states(seed=1)
    sn, tn, mn = s.numpy(), t.numpy(), mask.numpy()
    assert hidden_state_loss(s, t, mask, distance="cosine").item() == pytest.approx(
        reference_cosine(sn, tn, mn), rel=1e-5)
    assert hidden_state_loss(s, t, mask, normalize=True).item() == pytest.approx(
        reference_mse(reference_layer_norm(sn), reference_layer_norm(tn), mn), rel=1e-5)
    assert hidden_state_loss(s, t, mask, distance="cosine", normalize=True).item() == pytest.approx(
        reference_cosine(reference_layer_norm(sn), reference_layer_norm(tn), mn), rel=1e-5)
    # identical states: zero distance either way
    assert hidden_state_loss(s, s.clone(), mask).item() == 0.0
    assert hidden_state_loss(s, 3 * s, mask, distance="cosine").item() == pytest.approx(0.0, abs=1e-6)


def test_the_teacher_is_a_fixed_target_and_no_valid_position_gives_zero():
    s, t, mask = padded_states()
    s.requires_grad_(True)
    t.requires_grad_(True)
    hidden_state_loss(s, t, mask).backward()
    assert t.grad is None and s.grad is not None
    none = torch.zeros_like(mask)
    assert hidden_state_loss(s, t, none).item() == 0.0
    assert hidden_state_loss(s, t, none, distance="cosine").item() == 0.0


def test_distance_errors():
    s, t, mask = padded_states()
    with pytest.raises(ValueError, match="distance must be one of"):
        hidden_state_loss(s, t, mask, distance="l1")
    with pytest.raises(ValueError, match="project the student's onto the teacher's width"):
        hidden_state_loss(s[..., :4], t, mask)
    with pytest.raises(ValueError, match="mask must be \\(B, T\\)"):
        hidden_state_loss(s, t, mask[:, :2])


# --------------------------------------------------------------------------- the module


def outputs(features: dict[str, torch.Tensor]) -> Outputs:
    return Outputs(torch.zeros(1, 1), features)


def test_the_module_masks_with_the_attention_mask_and_projects():
    g = torch.Generator().manual_seed(2)
    hs, ht = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 6, generator=g)
    ids = torch.zeros(2, 5, dtype=torch.long)
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    targets = torch.tensor([[1, 1, 1, 1, -100], [1, -100, -100, -100, -100]])  # last valid position not trained on
    batch = Batch({"input_ids": ids, "attention_mask": attention}, targets)
    loss = HiddenStateLoss("s", "t")
    so, to = outputs({"s": hs}), outputs({"t": ht})
    loss.setup(so, to)
    assert isinstance(loss.projection, nn.Linear)
    assert tuple(loss.projection.weight.shape) == (6, 4) and tuple(loss.projection.bias.shape) == (6,)
    w, b = loss.projection.weight.detach().numpy(), loss.projection.bias.detach().numpy()
    projected = hs.numpy().astype(np.float64) @ w.T.astype(np.float64) + b
    got = loss(so, to, batch).item()
    assert got == pytest.approx(reference_mse(projected, ht.numpy(), attention.numpy().astype(bool)), rel=1e-5)
    # the attention mask, not the targets: position 4 of row 0 and 1 of row 1 count
    assert got != pytest.approx(reference_mse(projected, ht.numpy(), targets.numpy() >= 0), rel=1e-3)
    # no attention mask: the trained-on positions; no batch: every position
    no_attention = Batch({"input_ids": ids}, targets)
    assert loss(so, to, no_attention).item() == pytest.approx(
        reference_mse(projected, ht.numpy(), targets.numpy() >= 0), rel=1e-5)
    assert loss(so, to).item() == pytest.approx(reference_mse(projected, ht.numpy(), np.ones((2, 5), bool)), rel=1e-5)
    assert hidden_state_mask(None, (2, 5)) is None


def test_projection_options():
    hs, ht = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    same = HiddenStateLoss("s", "t")
    same.setup(outputs({"s": hs}), outputs({"t": ht}))
    assert isinstance(same.projection, nn.Identity) and not list(same.parameters())
    forced = HiddenStateLoss("s", "t", projection=True)
    forced.setup(outputs({"s": hs}), outputs({"t": ht}))
    assert isinstance(forced.projection, nn.Linear) and tuple(forced.projection.weight.shape) == (8, 8)
    refused = HiddenStateLoss("s", "t", projection=False)
    with pytest.raises(ValueError, match="projection=False"):
        refused.setup(outputs({"s": hs[..., :4]}), outputs({"t": ht}))
    with pytest.raises(RuntimeError, match="call loss.setup"):
        HiddenStateLoss("s", "t")(outputs({"s": hs}), outputs({"t": ht}))
    with pytest.raises(ValueError, match=r"\(B, T, D\)"):
        HiddenStateLoss("s", "t").setup(outputs({"s": hs[:, 0]}), outputs({"t": ht[:, 0]}))
    with pytest.raises(ValueError, match="distance must be one of"):
        HiddenStateLoss("s", "t", distance="kl")
    # built once: a second setup with the same widths keeps the (possibly trained or loaded) weights
    weight = forced.projection.weight
    forced.setup(outputs({"s": hs}), outputs({"t": ht}))
    assert forced.projection.weight is weight


# --------------------------------------------------------------------------- with the Distiller


def test_hidden_state_losses_builds_one_loss_per_mapped_pair():
    teacher, student = llama(32, 4), llama(16, 2, seed=1)
    losses = hidden_state_losses(student, teacher, weight=0.5, distance="cosine")
    assert list(losses) == ["hidden_s0_t1", "hidden_s1_t3"]
    (first, w0), (second, w1) = losses.values()
    assert (w0, w1) == (0.5, 0.5)
    assert first.taps == {"student": "model.layers.0", "teacher": "model.layers.1"}
    assert second.taps == {"student": "model.layers.1", "teacher": "model.layers.3"}
    assert first.distance == "cosine"
    assert list(hidden_state_losses(student, teacher, "last")) == ["hidden_s1_t3"]
    with pytest.raises(ValueError, match="student layers 0..1, teacher layers 0..3"):
        hidden_state_losses(student, teacher, [(0, 4)])


def test_projections_are_trained_with_the_student():
    teacher, student = llama(32, 4), llama(16, 2, seed=1)
    loss = WeightedSum({"kd": (KDLoss(1.0), 1.0), **hidden_state_losses(student, teacher)})
    d = Distiller(student=student, teacher=teacher, device="cpu")
    d.compile(torch.optim.SGD(student.parameters(), lr=0.1), distillation_loss_fn=loss, alpha=0.5)
    batch = token_batch()
    d.setup(batch)
    projections = [loss.parts[name].projection for name in ("hidden_s0_t1", "hidden_s1_t3")]
    in_optimizer = {id(p) for g in d.optimizer.param_groups for p in g["params"]}
    for proj in projections:
        assert tuple(proj.weight.shape) == (32, 16)
        assert id(proj.weight) in in_optimizer and id(proj.bias) in in_optimizer
    before = [p.weight.detach().clone() for p in projections]
    logs = d.train_step(batch)
    assert torch.isfinite(logs["loss"])
    for proj, old in zip(projections, before):
        assert not torch.equal(proj.weight, old)
    # saved with the loss, and restored into the projections a fresh set-up builds (a resume)
    state = loss.state_dict()
    assert {"parts.hidden_s0_t1.projection.weight", "parts.hidden_s1_t3.projection.bias"} <= set(state)
    again = WeightedSum({"kd": (KDLoss(1.0), 1.0), **hidden_state_losses(student, teacher)})
    d2 = Distiller(student=student, teacher=teacher, device="cpu")
    d2.compile(torch.optim.SGD(student.parameters(), lr=0.1), distillation_loss_fn=again, alpha=0.5)
    d2.setup(batch)
    again.load_state_dict(state)
    torch.testing.assert_close(again.parts["hidden_s1_t3"].projection.weight, projections[1].weight)


def test_fit_with_a_logit_loss_and_uniformly_mapped_hidden_states():
    teacher, student = llama(32, 4), llama(16, 2, seed=1)
    teacher_weights = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_weights = {k: v.clone() for k, v in student.state_dict().items()}
    loss = WeightedSum({"kd": (KDLoss(1.0), 1.0), **hidden_state_losses(student, teacher)})
    batches = [token_batch(seed=i) for i in range(3)]
    loader = DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
    d = Distiller(student=student, teacher=teacher, device="cpu")
    d.compile(torch.optim.Adam(student.parameters(), lr=1e-3), distillation_loss_fn=loss, alpha=0.5)
    history = d.fit(loader, epochs=1, verbose=0).history
    for key in ("loss", "distillation/kd", "distillation/hidden_s0_t1", "distillation/hidden_s1_t3"):
        assert key in history, sorted(history)
        assert all(math.isfinite(v) for v in history[key])
    parts = ("distillation/kd", "distillation/hidden_s0_t1", "distillation/hidden_s1_t3")
    assert sum(history[k][0] for k in parts) == pytest.approx(history["distillation_loss"][0], rel=1e-5)
    assert all(torch.equal(v, teacher_weights[k]) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(v, student_weights[k]) for k, v in student.state_dict().items())


def test_gpt2_pairs_distil_through_the_same_path():
    teacher, student = gpt2(32, 4), gpt2(16, 2, seed=1)
    losses = hidden_state_losses(student, teacher)
    assert [part.taps["teacher"] for part, _ in losses.values()] == ["transformer.h.1", "transformer.h.3"]
    d = Distiller(student=student, teacher=teacher, device="cpu")
    d.compile(torch.optim.Adam(student.parameters(), lr=1e-3),
              distillation_loss_fn=WeightedSum({"kd": (KDLoss(1.0), 1.0), **losses}), alpha=0.5)
    logs = d.train_step(token_batch())
    assert torch.isfinite(logs["distillation/hidden_s1_t3"]) and logs["distillation/hidden_s1_t3"] > 0


def test_one_pair_in_yaml():
    from kdistill.config import DistilStage
    from kdistill.experiment import build_losses

    stage = DistilStage.model_validate({"losses": [
        {"name": "kd"},
        {"name": "hidden_states", "student_layer": "model.layers.1", "teacher_layer": "model.layers.3",
         "weight": 0.5, "distance": "cosine"},
        {"name": "hidden_states", "student_layer": "model.layers.0", "teacher_layer": "model.layers.1"},
    ]})
    built = build_losses(stage)
    assert isinstance(built, WeightedSum)
    assert list(built.parts) == ["kd", "hidden_states", "hidden_states_"]
    first = built.parts["hidden_states"]
    assert isinstance(first, HiddenStateLoss) and first.distance == "cosine"
    assert first.taps == {"student": "model.layers.1", "teacher": "model.layers.3"}
    assert built.weights["hidden_states"] == 0.5
    assert built.parts["hidden_states_"].taps["teacher"] == "model.layers.1"
    with pytest.raises(ValueError, match="takes no argument 'layer'"):
        DistilStage.model_validate({"losses": [{"name": "hidden_states", "layer": "model.layers.1"}]})
