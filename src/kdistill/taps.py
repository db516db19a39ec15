"""How the engine calls a model: checked forward passes.

A model that rejects its inputs raises deep inside PyTorch ("mat1 and mat2 shapes cannot
be multiplied"); :class:`CheckedForward` turns that into an error that names the model's
role, the shape given and the shape expected. Only the first batch of each new input
shape and dtype pays for the check.

Feature taps: :class:`FeatureTaps` captures the outputs (or inputs) of modules named by
path (``"layer3"``, ``"features.4"``, ``"fc:input"``) with forward hooks; the Distiller
installs them for the layers its losses declare. :func:`list_layers` lists every path with
its output shape (``kdistill layers MODEL``).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ModelInputError
from .outputs import Inputs


def logits_of(out) -> torch.Tensor:
    """The logits in what a model returned: a tensor as it is; a Hugging Face
    ``ModelOutput`` (or a dict) by its ``logits``; a tuple by its first element."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):
        logits = out.get("logits")
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        logits = out[0]
    return logits if isinstance(logits, torch.Tensor) else out


def call_model(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """Run ``model`` on a batch's inputs and return its logits.

    A tensor is passed positionally (``model(x)``); a dict as keyword arguments
    (``model(input_ids=..., attention_mask=...)``), with ``use_cache=False`` for a model
    whose config has a ``use_cache`` (a Hugging Face model: training and scoring need no
    key/value cache). A ``ModelOutput`` is reduced to its ``logits``.
    """
    out = _raw_call(model, inputs)
    return out if isinstance(out, torch.Tensor) else logits_of(out)


def _raw_call(model: nn.Module, inputs: Inputs):
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    config = getattr(getattr(model, "module", model), "config", None)
    if getattr(config, "use_cache", None) is not None:
        return model(**inputs, use_cache=False)
    return model(**inputs)


def _input_kind(inputs: Inputs) -> tuple:
    """What a forward pass is checked once per: the shape (without the batch axis) and
    dtype of each input."""
    if isinstance(inputs, torch.Tensor):
        return (tuple(inputs.shape[1:]), inputs.dtype)
    return tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in inputs.items())


def _describe_inputs(inputs: Inputs) -> str:
    if isinstance(inputs, torch.Tensor):
        return f"inputs of shape {tuple(inputs.shape)} (dtype {inputs.dtype})"
    return "inputs " + ", ".join(f"{k} {tuple(v.shape)} ({str(v.dtype).replace('torch.', '')})"
                                 for k, v in inputs.items())


def describe_expected_input(model: nn.Module) -> str:
    """What a model expects as input, as far as its ``input_shape`` or first layer tells."""
    shape = getattr(model, "input_shape", None)
    if shape is not None:
        return f"(batch, {', '.join(str(s) for s in shape)})"
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return f"(batch, {m.in_channels}, ...) with {m.in_channels} input channels"
        if isinstance(m, nn.Linear):
            return f"(batch, {m.in_features})"
    return "the shape its first layer takes"


class CheckedForward:
    """Calls models, explaining the first rejection of each new input shape and dtype.

    Args:
        role: how the model is named in errors (``"model"``, ``"student"``, ``"teacher"``).
    """

    def __init__(self, role: str = "model"):
        self.role = role
        #: input kinds checked already (shapes without the batch axis, dtypes)
        self.accepted: set[tuple] = set()
        #: those of them for which the model returned a plain tensor (``model(x)`` is the logits)
        self.plain: set[tuple] = set()

    def __call__(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
        kind = _input_kind(inputs)
        if kind in self.accepted:
            if isinstance(inputs, torch.Tensor):
                return call_model(model, inputs)
            try:  # token ids change from batch to batch: an id out of range is explained on any batch
                return call_model(model, inputs)
            except IndexError:
                pass  # explained below
        try:
            raw = _raw_call(model, inputs)
        except (RuntimeError, ValueError, IndexError, TypeError) as e:
            if isinstance(inputs, dict):
                ids = inputs.get("input_ids")
                vocab = getattr(getattr(getattr(model, "module", model), "config", None), "vocab_size", None)
                fix = ("Tokenise the data with this model's tokenizer: a token id reaches "
                       f"{int(ids.max())} but the model has {vocab} embeddings."
                       if ids is not None and vocab is not None and int(ids.max()) >= vocab
                       else "Give the model the keyword arguments its forward takes (input_ids, attention_mask, ...).")
                raise ModelInputError(
                    f"the {self.role} ({type(model).__name__}) rejected {_describe_inputs(inputs)}. "
                    f"{fix} ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})"
                ) from e
            if isinstance(e, TypeError):
                raise
            float_model = any(p.is_floating_point() for p in model.parameters())
            fix = (
                "Convert the inputs to float first, e.g. x.astype('float32') / 255 for 8-bit images."
                if float_model and not inputs.is_floating_point()
                else "Reshape the data or build the model for it."
            )
            raise ModelInputError(
                f"the {self.role} ({type(model).__name__}) rejected inputs of shape {tuple(inputs.shape)} "
                f"(dtype {inputs.dtype}); it expects {describe_expected_input(model)}. "
                f"{fix} ({type(e).__name__}: {str(e).splitlines()[0]})"
            ) from e
        out = raw if isinstance(raw, torch.Tensor) else logits_of(raw)
        if not isinstance(out, torch.Tensor) or out.dim() < 2:
            raise ModelInputError(
                f"the {self.role} ({type(model).__name__}) returned {type(out).__name__}"
                f"{'' if not isinstance(out, torch.Tensor) else ' of shape ' + str(tuple(out.shape))}; "
                "kdistill expects (B, C) logits (or (B, T, V) for sequences)"
            )
        self.accepted.add(kind)
        if out is raw:
            self.plain.add(kind)
        return out


# --------------------------------------------------------------------------- feature taps
INPUT_SUFFIX = ":input"


def split_tap(path: str) -> tuple[str, bool]:
    """``"fc:input"`` -> ``("fc", True)``; ``"layer3"`` -> ``("layer3", False)``."""
    if path.endswith(INPUT_SUFFIX):
        return path[: -len(INPUT_SUFFIX)], True
    return path, False


def resolve_module(model: nn.Module, path: str, *, role: str = "model") -> nn.Module:
    """The submodule at ``path`` (``"layer3"``, ``"features.4"``, ``"blocks.2.mlp"``).

    Raises:
        ValueError: no such module; the message lists the closest existing paths.
    """
    import difflib

    modules = dict(model.named_modules())
    if path in modules and path != "":
        return modules[path]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.4)
    hint = f"; the closest are: {', '.join(close)}" if close else ""
    raise ValueError(
        f"the {role} ({type(model).__name__}) has no layer '{path}'{hint}. "
        f"`kdistill layers MODEL` or kdistill.taps.list_layers(model, x) lists every path with its output shape"
        + ("" if close else f" (its top-level layers: {', '.join(n for n in names if '.' not in n)[:300]})")
    )


class FeatureTaps:
    """Forward hooks that capture the outputs (or, with a ``:input`` suffix, the inputs)
    of named modules of one model into :attr:`captured`.

    Example::

        taps = FeatureTaps(student, ["layer3", "fc:input"], role="student")
        with taps:
            logits = student(x)
        taps.captured["layer3"]  # (B, C, H, W)

    Args:
        model: the network.
        paths: module paths, optionally with ``:input``.
        role: how the model is named in errors.

    Raises:
        ValueError: a path that does not exist (closest names listed), at construction.
    """

    def __init__(self, model: nn.Module, paths, *, role: str = "model"):
        self.model = model
        self.paths = sorted(set(paths))
        self.role = role
        self.modules = {p: resolve_module(model, split_tap(p)[0], role=role) for p in self.paths}
        self.captured: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _store(self, path: str, value) -> None:
        if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
            value = value[0]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"the {self.role}'s layer '{path}' produced a {type(value).__name__}, not a tensor; tap another layer")
        self.captured[path] = value

    def install(self) -> "FeatureTaps":
        if self._handles:
            return self
        for path, module in self.modules.items():
            if split_tap(path)[1]:
                self._handles.append(module.register_forward_pre_hook(lambda m, args, p=path: self._store(p, args[0] if args else None)))
            else:
                self._handles.append(module.register_forward_hook(lambda m, args, out, p=path: self._store(p, out)))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def pop(self) -> dict[str, torch.Tensor]:
        """The tensors captured since the last call (and forget them)."""
        out, self.captured = self.captured, {}
        return out

    def __enter__(self) -> "FeatureTaps":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()


def list_layers(model: nn.Module, sample_input: torch.Tensor) -> list[dict]:
    """Every named module of ``model`` with the shape of its output on ``sample_input``.

    Args:
        model: the network (run once, in eval mode, without gradients).
        sample_input: a batch, e.g. ``torch.zeros(2, 3, 32, 32)``.

    Returns:
        ``[{"path": "layer1.0.conv1", "type": "Conv2d", "output_shape": [2, 16, 32, 32],
        "parameters": 2304}, ...]`` in execution order (parameters of the module and its
        children); modules that did not run are left out.
    """
    records: dict[str, dict] = {}
    handles = []

    def hook(path):
        def fn(module, args, out):
            if path not in records:
                value = out[0] if isinstance(out, (tuple, list)) and out else out
                records[path] = {
                    "path": path, "type": type(module).__name__,
                    "output_shape": list(value.shape) if isinstance(value, torch.Tensor) else None,
                    "parameters": sum(p.numel() for p in module.parameters()),
                }
        return fn

    for path, module in model.named_modules():
        if path:
            handles.append(module.register_forward_hook(hook(path)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(sample_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return list(records.values())
