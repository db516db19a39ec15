"""Deep mutual learning (online distillation): two or more peers trained together, each
distilling from the others' current predictions; no pre-trained teacher.

Zhang, Xiang, Hospedales & Lu (2018), "Deep Mutual Learning", CVPR, arXiv:1706.00384.
With ``K`` peers, ``p_k = softmax(z_k / T)`` peer ``k``'s softened distribution, peer
``k`` minimises (eq. 10 of the paper, in this package's ``alpha`` convention)::

    L_k = alpha * CE(z_k, y) + (1 - alpha) * T^2 * 1/(K-1) * sum_{l != k} KL(p_l || p_k)

with the other peers' ``p_l`` taken as fixed targets (detached). ``target="ensemble"``
uses the paper's variant with one teacher, the mean of the others' distributions
(``KL(mean_{l != k} p_l || p_k)``, "DML_e"); with two peers both are the same loss.
``alpha = 0.5, T = 1`` is the paper's loss, halved.

Decisions (named so they can be checked):

* The peers are updated *simultaneously*: every peer's loss is computed from the same
  forward pass, then every peer's optimizer steps. The paper's Algorithm 1 updates peer 1
  first and recomputes peer 2's target with it; the common implementations, and this
  one, do not (one forward per peer and batch).
* One backward pass of ``sum_k L_k`` gives each peer the gradient of its own loss: the
  targets of ``L_k`` are detached, so no other term reaches peer ``k``'s parameters.
* Each peer has its own optimizer (:class:`PeerOptimizers` holds them; one state dict
  holds all), so per-parameter state and learning rates are the peer's own.
* Under ``torchrun`` the stack of peers is wrapped in one ``DistributedDataParallel``;
  that is the same as one per peer, because DDP averages each parameter's gradient
  across processes and each parameter belongs to one peer (its gradient comes from that
  peer's loss only).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .distiller import OPTIMIZERS, Trainer
from .losses.logits import check_temperature
from .outputs import Batch
from .data.loader import make_loader

#: How a peer's distillation target is made from the other peers (see :func:`mutual_loss`).
TARGETS = ("peers", "ensemble")


def mutual_loss(logits: torch.Tensor, temperature: float = 1.0, *, target: str = "peers",
                temperature_squared: bool = True) -> torch.Tensor:
    """Each peer's mimicry term of deep mutual learning (Zhang et al. 2018, eq. 10).

    ``target="peers"``: ``D_k = 1/(K-1) sum_{l != k} KL(p_l || p_k)``;
    ``target="ensemble"``: ``D_k = KL(q_k || p_k)`` with ``q_k = 1/(K-1) sum_{l != k} p_l``;
    ``p = softmax(z / T)``, ``KL(p || q) = sum_c p_c (log p_c - log q_c)``, averaged over
    the batch, times ``T^2`` (as :func:`kdistill.kd_loss`) unless ``temperature_squared``
    is false. The targets ``p_l`` are detached: ``D_k``'s gradient reaches peer ``k`` only.

    Args:
        logits: ``(K, B, C)``, the ``K >= 2`` peers' scores on the same batch.
        temperature: softening temperature ``T > 0``.
        target: ``"peers"`` (the mean of the KLs to each other peer) or ``"ensemble"``
            (the KL to the mean of the other peers' distributions).
        temperature_squared: multiply by ``T^2``.

    Returns:
        ``(K,)``: peer ``k``'s term at index ``k``.

    Raises:
        ValueError: fewer than 2 peers, a shape other than ``(K, B, C)``, an unknown target.
    """
    if logits.dim() != 3 or logits.shape[0] < 2:
        raise ValueError(f"logits must be (K, B, C) with K >= 2 peers, got shape {tuple(logits.shape)}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")
    t = check_temperature(temperature)
    k, b = logits.shape[0], logits.shape[1]
    logp = F.log_softmax(logits.float() / t, dim=-1)  # (K, B, C)
    p_fixed = logp.detach().exp()  # the targets: no gradient
    if target == "peers":
        # kl[l, k] = mean_b sum_c p_l (log p_l - log p_k)
        own = (p_fixed * logp.detach()).sum(-1).mean(-1)  # (K,): mean_b sum_c p_l log p_l
        cross = torch.einsum("lbc,kbc->lk", p_fixed, logp) / b  # (K, K)
        kl = own[:, None] - cross
        off = ~torch.eye(k, dtype=torch.bool, device=logits.device)
        out = (kl * off).sum(0) / (k - 1)
    else:
        q = (p_fixed.sum(0, keepdim=True) - p_fixed) / (k - 1)  # (K, B, C): mean of the others
        out = (torch.xlogy(q, q) - q * logp).sum(-1).mean(-1)
    return out * (t * t) if temperature_squared else out


class PeerStack(nn.Module):
    """The peers as one module: ``forward(x)`` stacks their logits, ``(K, B, C)``. Its
    state dict holds every peer (``peers.<k>.<name>``)."""

    def __init__(self, peers: Sequence[nn.Module]):
        super().__init__()
        self.peers = nn.ModuleList(peers)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        outs = []
        for i, peer in enumerate(self.peers):
            z = peer(*args, **kwargs)
            z = getattr(z, "logits", z)
            if z.dim() != 2:
                raise ValueError(f"mutual learning trains classifiers: peer {i + 1} returned logits of shape "
                                 f"{tuple(z.shape)}, expected (B, C)")
            outs.append(z)
        shapes = {tuple(z.shape) for z in outs}
        if len(shapes) > 1:
            raise ValueError(f"the peers score different numbers of classes ({[tuple(z.shape) for z in outs]}): "
                             "build every peer with the same num_classes")
        return torch.stack(outs)  # K x (B, C) -> (K, B, C)


class PeerOptimizers(torch.optim.Optimizer):
    """One optimizer per peer, driven as one: ``step`` and ``zero_grad`` call each;
    ``param_groups`` lists the groups of each (the same dicts, so a learning-rate
    schedule built over this object schedules every peer); ``state_dict`` holds each
    optimizer's state (``{"peers": [...]}``)."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        optimizers = list(optimizers)
        if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
            raise TypeError("PeerOptimizers takes a list of torch.optim.Optimizer, one per peer")
        params = [p for o in optimizers for g in o.param_groups for p in g["params"]]
        self.optimizers: list[torch.optim.Optimizer] = []  # (empty while the base class adds its group)
        super().__init__(params, {})
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        # read from the optimizers each time: their load_state_dict replaces their group dicts
        return [g for o in self.optimizers for g in o.param_groups]

    @param_groups.setter
    def param_groups(self, value: Any) -> None:
        pass  # the optimizers' groups are the groups (torch.optim.Optimizer.__init__ assigns a list)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if closure is not None:
            raise ValueError("PeerOptimizers.step takes no closure")
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict[str, Any]:
        return {"peers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("peers") if isinstance(state_dict, dict) else None
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            got = "a single optimizer's state" if saved is None else f"{len(saved)} optimizers' states"
            raise ValueError(f"the optimizer state holds {got}, this MutualLearning has {len(self.optimizers)} "
                             "peers: resume with the peers the state was saved from")
        for o, s in zip(self.optimizers, saved):
            o.load_state_dict(s)


class MutualLearning(Trainer):
    """Deep mutual learning of two or more peers (Zhang et al. 2018; see the module's
    docstring for the loss and the decisions).

    Example::

        peers = [build_model("classic_student") for _ in range(2)]
        dml = MutualLearning(peers)
        dml.compile(optimizer="adam", metrics=["accuracy"], alpha=0.5, temperature=1.0)
        dml.fit(x_train, y_train, epochs=3, validation_data=(x_test, y_test))
        dml.evaluate(x_test, y_test)   # peer1_accuracy, peer2_accuracy, accuracy (their mean), ...

    Everything :class:`~kdistill.Trainer` offers applies: ``fit``'s arguments, callbacks,
    :class:`~kdistill.callbacks.TrainingCheckpoint` (one state file holds every peer,
    every optimizer and the data position; ``fit(resume_from=...)`` continues it),
    ``precision``, ``accumulate_steps``, a learning-rate schedule (applied to every peer),
    and ``torchrun`` (see the module's docstring).

    Logs, per step and epoch: ``loss`` (the mean of the peers' losses), and for peer ``k``
    (from 1) ``peer{k}_loss``, ``peer{k}_student_loss`` (cross-entropy),
    ``peer{k}_distillation_loss`` (the mimicry term) and ``peer{k}_<metric>``; each
    metric also as the mean over the peers (``accuracy``).

    Args:
        peers: ``K >= 2`` distinct networks mapping the same inputs to ``(B, C)`` logits of
            the same classes; any architectures. Peers of one architecture should start
            from different weights (identical peers on identical batches stay identical).
        device: where to train (default: :func:`kdistill.runtime.get_device`).
    """

    model_role = "peers"

    def __init__(self, peers: Sequence[nn.Module], *, device: str | torch.device | None = None):
        peers = list(peers)
        if len(peers) < 2:
            raise ValueError(f"mutual learning needs at least 2 peers, got {len(peers)}; train a single network "
                             "with kdistill.Trainer")
        for i, p in enumerate(peers):
            if not isinstance(p, nn.Module):
                raise TypeError(f"peer {i + 1} must be a torch.nn.Module, got {type(p).__name__}")
        if len({id(p) for p in peers}) != len(peers):
            raise ValueError("the same network is given twice as a peer: give distinct networks (e.g. one build "
                             "call per peer)")
        super().__init__(PeerStack(peers), device=device)
        self.alpha = 0.5
        self.temperature = 1.0
        self.target = "peers"
        self.temperature_squared = True

    @property
    def peers(self) -> list[nn.Module]:
        """The peer networks, in the order given."""
        return list(self.model.peers)

    def compile(
        self,
        optimizer: Any = "adam",
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        metrics: Sequence[Any] | None = None,
        *,
        alpha: float = 0.5,
        temperature: float = 1.0,
        target: str = "peers",
        temperature_squared: bool = True,
        learning_rate: float | None = None,
        scheduler: Any = None,
        scheduler_interval: str = "epoch",
        precision: str = "fp32",
        accumulate_steps: int = 1,
        max_grad_norm: float | None = None,
    ) -> "MutualLearning":
        """Configure training.

        Args:
            optimizer: a name (``"adam"``, ``"sgd"``, ...; one optimizer of that kind per
                peer, at ``learning_rate``), a factory ``params -> Optimizer`` (called once
                per peer), or a list of optimizers, one per peer over that peer's
                parameters. One optimizer over all peers is refused.
            loss: the hard-label loss ``(logits, targets)``; default cross-entropy.
            metrics: as :meth:`kdistill.Trainer.compile`, computed for every peer.
            alpha: weight of the hard-label loss in ``[0, 1]``; ``1 - alpha`` weighs the
                mimicry term.
            temperature: softening temperature of the mimicry term (the paper: 1).
            target: ``"peers"`` (the paper's mean of KLs) or ``"ensemble"`` (KL to the
                mean of the other peers' distributions).
            temperature_squared: multiply the mimicry term by ``T^2``.
            learning_rate, scheduler, scheduler_interval, precision, accumulate_steps: as
                :meth:`kdistill.Trainer.compile` (the scheduler is built over all peers'
                optimizers).
            max_grad_norm: not supported (clipping would join the peers' gradient norms);
                must be ``None``.

        Raises:
            ValueError: ``alpha`` outside ``[0, 1]``, an unknown ``target``, a list of
                optimizers that is not one per peer over that peer's parameters, an
                optimizer holding several peers' parameters, ``max_grad_norm`` set.
        """
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (the weight of the hard-label loss), got {alpha!r}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")
        if max_grad_norm is not None:
            raise ValueError(f"max_grad_norm={max_grad_norm!r}: gradient clipping is not supported in mutual learning "
                             "(one norm over all peers would couple them); remove max_grad_norm")
        self.alpha, self.target = float(alpha), target
        self.temperature = check_temperature(temperature)
        self.temperature_squared = bool(temperature_squared)
        opts = self._peer_optimizers(optimizer, learning_rate)
        super().compile(opts, loss=loss, metrics=metrics, scheduler=scheduler, scheduler_interval=scheduler_interval,
                        precision=precision, accumulate_steps=accumulate_steps)
        return self

    def _peer_optimizers(self, spec: Any, learning_rate: float | None) -> PeerOptimizers:
        peers = self.peers
        if isinstance(spec, torch.optim.Optimizer):
            raise ValueError("MutualLearning trains each peer with its own optimizer: pass a name ('adam'), a factory "
                             "(lambda params: torch.optim.SGD(params, lr=0.1)) or a list of optimizers, one per peer")
        if isinstance(spec, (list, tuple)):
            if learning_rate is not None:
                raise ValueError("learning_rate is only used with an optimizer given by name")
            opts = list(spec)
            if len(opts) != len(peers) or not all(isinstance(o, torch.optim.Optimizer) for o in opts):
                raise ValueError(f"optimizer: a list needs one torch.optim.Optimizer per peer ({len(peers)}), "
                                 f"got {len(opts)} item(s)")
        elif isinstance(spec, str):
            key = spec.lower()
            if key not in OPTIMIZERS:
                raise ValueError(f"unknown optimizer {spec!r}: expected one of {sorted(OPTIMIZERS)}, a factory or a "
                                 "list of optimizers (one per peer)")
            cls, default_lr = OPTIMIZERS[key]
            lr = default_lr if learning_rate is None else learning_rate
            opts = [cls([p for p in peer.parameters() if p.requires_grad], lr=lr) for peer in peers]
        elif callable(spec):
            if learning_rate is not None:
                raise ValueError("learning_rate is only used with an optimizer given by name")
            opts = [spec([p for p in peer.parameters() if p.requires_grad]) for peer in peers]
            for o in opts:
                if not isinstance(o, torch.optim.Optimizer):
                    raise TypeError(f"the optimizer factory returned {type(o).__name__}, not a torch.optim.Optimizer")
        else:
            raise TypeError(f"optimizer must be a name, a factory or a list of optimizers (one per peer), "
                            f"got {type(spec).__name__}")
        for i, (peer, o) in enumerate(zip(peers, opts)):
            mine = {id(p) for p in peer.parameters()}
            held = {id(p) for g in o.param_groups for p in g["params"]}
            if not held or not held <= mine:
                raise ValueError(f"optimizer {i + 1} must hold parameters of peer {i + 1} only (each peer has its own "
                                 f"optimizer, in the order of the peers); build it over peers[{i}].parameters()")
        return PeerOptimizers(opts)

    # ------------------------------------------------------------------ steps
    def peer_losses(self, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """Each peer's loss terms on ``batch`` from the stacked logits ``(K, B, C)``:
        ``peer{k}_loss``, ``peer{k}_student_loss``, ``peer{k}_distillation_loss`` and
        ``loss`` (the sum of the peers' losses, what one backward pass takes)."""
        mimic = mutual_loss(logits, self.temperature, target=self.target,
                            temperature_squared=self.temperature_squared)  # (K,)
        out: dict[str, torch.Tensor] = {}
        total = logits.new_zeros(())
        for k in range(logits.shape[0]):
            ce, _ = self.supervised_loss(logits[k], batch)
            lk = self.alpha * ce + (1.0 - self.alpha) * mimic[k]
            out[f"peer{k + 1}_loss"], out[f"peer{k + 1}_student_loss"] = lk, ce
            out[f"peer{k + 1}_distillation_loss"] = mimic[k]
            total = total + lk
        out["loss"] = total
        return out

    def train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One step of every peer on ``batch``: one forward of each, the losses, one
        backward of their sum, every peer's optimizer step."""
        logits = self.forward(self.training_model, batch.inputs)  # (K, B, C)
        terms = self.peer_losses(logits, batch)
        total = terms["loss"]
        logs = {name: v.detach() for name, v in terms.items()}
        logs["loss"] = logs["loss"] / logits.shape[0]  # logged: the mean of the peers' losses
        logs.update(self.compute_metrics(logits.detach(), batch))
        self._read_step_logs(logs, ("loss",))  # a NaN loss stops before the optimizer step
        self.optimize(total, weight=self.micro_step().samples)
        return logs

    def test_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        logits = self.forward(self.model, batch.inputs)
        logs: dict[str, torch.Tensor] = {}
        if batch.targets is not None and (batch.labelled is None or bool(batch.labelled.any())):
            losses = [self.supervised_loss(logits[k], batch)[0] for k in range(logits.shape[0])]
            for k, v in enumerate(losses):
                logs[f"peer{k + 1}_loss"] = v
            logs["loss"] = torch.stack(losses).mean()
        logs.update(self.compute_metrics(logits, batch))
        return logs

    def compute_metrics(self, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """Each metric for every peer (``peer{k}_<name>``) and its mean over the peers."""
        out: dict[str, torch.Tensor] = {}
        per_peer = [Trainer.compute_metrics(self, logits[k], batch) for k in range(logits.shape[0])]
        for k, m in enumerate(per_peer):
            out.update({f"peer{k + 1}_{name}": v for name, v in m.items()})
        for name in per_peer[0]:
            out[name] = torch.stack([torch.as_tensor(m[name], dtype=torch.float32) for m in per_peer]).mean()
        return out

    def _step_weights(self, batch: Batch) -> dict[str, float]:
        weights = super()._step_weights(batch)
        n_lab = weights.get("loss", weights["*"])
        k = len(self.model.peers)
        for i in range(1, k + 1):
            weights[f"peer{i}_student_loss"] = n_lab
            for name in self.metrics:
                weights[f"peer{i}_{name}"] = n_lab
        return weights

    def predict(self, x: Any, *, batch_size: int = 256) -> torch.Tensor:
        """The peers' logits on ``x``, ``(K, N, C)`` on the CPU (eval mode, no gradients)."""
        loader = self._eval_loader(x, batch_size=batch_size) if isinstance(x, tuple) else make_loader(
            x, None, batch_size=batch_size, shuffle=False)
        was_training = self.model.training
        self.model.eval()
        outs = []
        with torch.inference_mode():
            for batch in loader:
                outs.append(self.forward(self.model, batch.to(self.device).inputs).cpu())
        self.model.train(was_training)
        return torch.cat(outs, dim=1)
