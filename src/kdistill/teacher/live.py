"""A teacher that runs its network on every batch (online distillation).

Speed options: ``channels_last`` (the memory format oneDNN's CPU convolutions prefer),
``autocast`` (bfloat16 / float16 mixed precision) and ``compile`` (``torch.compile``). Only
``channels_last`` is on by default, and only for convolutional teachers on the CPU, where
``benchmarks/live_teacher_speed.py`` measured it to help (numbers in
``docs/teacher_cache.md``).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from ..errors import ModelInputError
from ..outputs import Batch, Inputs, Outputs
from ..runtime import module_device
from ..taps import CheckedForward, FeatureTaps
from .base import Teacher

#: ``autocast=`` names and the devices each is accepted on.
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_LOW_PRECISION = (torch.bfloat16, torch.float16)


class LiveTeacher(Teacher):
    """Wraps a trained network as a frozen teacher.

    On construction the network's parameters get ``requires_grad=False`` and it is put in
    eval mode (dropout off, batch-norm statistics fixed); every forward runs under
    ``torch.inference_mode()``. Its outputs are cloned out of inference mode so losses can
    save them for the student's backward pass. The teacher is never handed to an
    optimizer: after ``fit`` its weights are bit-identical to what they were.

    Speed options. They change how the forward runs, not the form of what losses get: logits
    and tapped features always come back as ordinary (contiguous) tensors, float32
    after autocast.

    * ``channels_last``: the network's 4-D weights are converted (in place) to
      ``torch.channels_last`` and so is each batch's 4-D input (a copy: the batch the
      student sees is untouched). Outputs agree with the ordinary forward to float32
      rounding, not bit for bit. ``"auto"``, the default, turns it on for networks with
      ``nn.Conv2d`` layers on the CPU and off elsewhere. If the network's forward fails in
      that format (``x.view(...)`` after a convolution needs ``reshape``), ``"auto"`` warns
      and runs it in the ordinary format; ``True`` raises.
    * ``autocast``: ``"bfloat16"`` (any device) or ``"float16"`` (CUDA only) runs the
      forward under ``torch.autocast``; outputs are cast back to float32. Off by default:
      on CPUs without native bfloat16 it is slower than float32 and moves the logits.
    * ``compile``: ``True`` (default backend) or a ``torch.compile`` backend name
      compiles the forward. Off by default: the first calls of each new batch shape pay
      the compilation, and feature taps are refused with it (forward hooks do not fire
      reliably inside compiled code). If compilation or a compiled call fails while the
      ordinary forward of the same batch works, the teacher warns (``RuntimeWarning``)
      and runs eagerly from then on: same outputs, no speed-up. A batch that the ordinary
      forward rejects too raises as it would without ``compile``. The first batch of
      each input shape runs eagerly (checked forward).

    The measured effect of each option is in ``docs/teacher_cache.md``.

    With ``channels_last=False`` (and the other options off) the forward is exactly the
    ordinary one, bit for bit.

    Args:
        module: the trained teacher network.
        device: where it runs (the Distiller passes its own).
        channels_last: ``True``, ``False`` or ``"auto"`` (default; see above).
        autocast: ``None`` (default), ``"bfloat16"``, or ``"float16"`` on CUDA.
        compile: ``False`` (default), ``True``, or a backend name (``"inductor"``,
            ``"eager"``, ...; ``torch._dynamo.list_backends()``).

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: an option value that is not accepted (the message lists those that are).
    """

    def __init__(
        self,
        module: nn.Module,
        device: torch.device | str | None = None,
        *,
        channels_last: bool | str = "auto",
        autocast: str | torch.dtype | None = None,
        compile: bool | str = False,  # noqa: A002 - the torch.compile switch
    ):
        if not isinstance(module, nn.Module):
            raise TypeError(f"the teacher must be a torch.nn.Module, got {type(module).__name__}")
        if not (isinstance(channels_last, bool) or channels_last == "auto"):
            raise ValueError(f"channels_last must be True, False or 'auto', got {channels_last!r}")
        if not isinstance(compile, (bool, str)):
            raise ValueError(f"compile must be True, False or a torch.compile backend name, got {compile!r}")
        self.module = module
        if device is not None:
            module.to(device)
        module.requires_grad_(False)
        module.eval()
        self.device_type = module_device(module).type
        self.autocast = self._check_autocast(autocast, self.device_type)

        # 1. memory format: "auto" = convolutional networks on the CPU (measured to help)
        self.channels_last_option = channels_last
        if channels_last == "auto":
            channels_last = self.device_type == "cpu" and any(isinstance(m, nn.Conv2d) for m in module.modules())
        self.channels_last = bool(channels_last)
        if self.channels_last:
            module.to(memory_format=torch.channels_last)

        # 2. torch.compile, lazily (it compiles on the first compiled call)
        self.compile_option = compile
        self.compile_error: str | None = None
        self._compiled = None
        if compile:
            self._compiled = self._make_compiled(module, compile)

        self._forward = CheckedForward("teacher")
        self._taps: FeatureTaps | None = None

    # ------------------------------------------------------------------ option checks
    @staticmethod
    def _check_autocast(autocast, device_type: str) -> torch.dtype | None:
        if autocast is None:
            return None
        by_dtype = {v: k for k, v in AUTOCAST_DTYPES.items()}
        name = by_dtype.get(autocast, autocast) if isinstance(autocast, torch.dtype) else autocast
        if name not in AUTOCAST_DTYPES:
            raise ValueError(
                f"autocast must be None, 'bfloat16' or 'float16' (CUDA only), got {autocast!r}"
            )
        if name == "float16" and device_type != "cuda":
            raise ValueError(
                f"autocast='float16' runs only on CUDA; this teacher is on {device_type!r}. "
                "Use autocast='bfloat16' or None"
            )
        return AUTOCAST_DTYPES[name]

    def _make_compiled(self, module: nn.Module, compile: bool | str):
        backend = None if compile is True else compile
        if backend is not None:
            from torch import _dynamo

            known = _dynamo.list_backends(exclude_tags=())
            if backend not in known:
                raise ValueError(
                    f"compile={backend!r} is not a torch.compile backend; use True (the default "
                    f"backend), False, or one of {known}"
                )
        try:
            return torch.compile(module) if backend is None else torch.compile(module, backend=backend)
        except Exception as e:  # e.g. torch.compile unsupported on this Python
            self._compile_failed(e)
            return None

    def _compile_failed(self, error: BaseException) -> None:
        self._compiled = None
        self.compile_error = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
        warnings.warn(
            f"torch.compile of the teacher ({type(self.module).__name__}) failed ({self.compile_error}); "
            "it runs eagerly from now on (same outputs, without the speed-up). Pass compile=False to "
            "skip compiling.",
            RuntimeWarning,
            stacklevel=4,
        )

    # ------------------------------------------------------------------ taps
    def set_taps(self, paths) -> None:
        """Capture these layers' outputs (``Outputs.features``) on every call; ``[]`` stops.

        Raises:
            ValueError: a path the teacher does not have (closest names listed), or taps
                on a teacher built with ``compile`` (its forward hooks would not fire).
        """
        if self._taps is not None:
            self._taps.remove()
            self._taps = None
        paths = sorted(set(paths))
        if paths and self._compiled is not None:
            raise ValueError(
                f"the teacher was built with compile={self.compile_option!r}, and a loss reads its layers "
                f"{paths}: forward hooks do not fire reliably inside torch.compile'd code. Build it with "
                "LiveTeacher(module, compile=False) for feature-based distillation (logit losses may compile)"
            )
        if paths:
            self._taps = FeatureTaps(self.module, paths, role="teacher").install()

    def parameters(self):
        """The teacher's parameters (all frozen)."""
        return self.module.parameters()

    # ------------------------------------------------------------------ forward
    def __call__(self, batch: Batch) -> Outputs:
        # A caller's model.train() on a parent module would flip this back: re-assert.
        if self.module.training:
            self.module.eval()
        if self.autocast is None:
            amp = contextlib.nullcontext()
        else:
            amp = torch.autocast(device_type=self.device_type, dtype=self.autocast)
        with torch.inference_mode(), amp:
            logits = self._run(batch.inputs)
        features = {} if self._taps is None else {k: self._export(v) for k, v in self._taps.pop().items()}
        return Outputs(logits=self._export(logits), features=features)

    def _export(self, t: torch.Tensor) -> torch.Tensor:
        """An ordinary tensor for the losses: out of inference mode (a copy), float32
        after autocast, contiguous after channels_last."""
        if not (self.channels_last or self.autocast is not None):
            return t.clone()  # the plain path, exactly as before the speed options
        dtype = torch.float32 if self.autocast is not None and t.dtype in _LOW_PRECISION else t.dtype
        return t.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)

    def _run(self, inputs: Inputs) -> torch.Tensor:
        if not isinstance(inputs, torch.Tensor):  # a language model's keyword inputs (checked, logits of its output)
            return self._forward(self.module, inputs)
        x = inputs.contiguous(memory_format=torch.channels_last) if self.channels_last and inputs.dim() == 4 else inputs
        if (tuple(x.shape[1:]), x.dtype) not in self._forward.plain:
            return self._first_forward(x, inputs)
        if self._compiled is not None:
            try:
                return self._compiled(x)
            except Exception as e:
                out = self.module(x)  # the batch itself is bad: this raises, compile not blamed
                self._compile_failed(e)
                return out
        return self.module(x)

    def _first_forward(self, x: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """The first batch of each input shape runs eagerly through the checked forward
        (clear errors for bad inputs), and checks the network runs in channels-last."""
        if not self.channels_last:
            return self._forward(self.module, x)
        try:
            return self._forward(self.module, x)
        except ModelInputError as e:
            # 1. does it run in the ordinary format? (if not, the inputs are the problem: raise that)
            if self._taps is not None:
                self._taps.pop()
            self.module.to(memory_format=torch.contiguous_format)
            try:
                out = self._forward(self.module, inputs)
            except ModelInputError:
                self.module.to(memory_format=torch.channels_last)
                raise
            cause = e.__cause__ if e.__cause__ is not None else e
            reason = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0]}"
            if self.channels_last_option is True:
                self.module.to(memory_format=torch.channels_last)
                raise ModelInputError(
                    f"the teacher ({type(self.module).__name__}) fails in channels-last memory format ({reason}) "
                    "but runs in the ordinary one; pass channels_last=False (or 'auto', which falls back), "
                    "or use .reshape instead of .view in its forward"
                ) from cause
            # 2. "auto": the ordinary format from now on
            self.channels_last = False
            warnings.warn(
                f"channels_last='auto' is off for the teacher ({type(self.module).__name__}): its forward fails "
                f"in channels-last memory format ({reason}); it runs in the ordinary format (slower on the CPU). "
                "Pass channels_last=False to silence this.",
                RuntimeWarning,
                stacklevel=4,
            )
            return out

    def __repr__(self) -> str:
        cl = f"{self.channels_last}" + (" (auto)" if self.channels_last_option == "auto" else "")
        amp = None if self.autocast is None else str(self.autocast).removeprefix("torch.")
        comp = repr(self.compile_option) + (" (failed: eager)" if self.compile_error else "")
        return f"LiveTeacher({type(self.module).__name__}, channels_last={cl}, autocast={amp!r}, compile={comp})"
