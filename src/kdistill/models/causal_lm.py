"""Hugging Face causal language models as teachers and students, never downloaded.

Two ways to get one (``transformers`` is the optional extra ``kdistill[text]``, imported
only here and only when called):

* :func:`causal_lm` builds a randomly initialised model from a configuration: an
  architecture name of ``transformers`` (``"llama"``, ``"qwen2"``, ``"gpt2"``, ...) and
  its configuration keys, or a ``PretrainedConfig`` you made. For tests, demos and the
  text main job.
* :func:`load_causal_lm` loads a model saved on this machine
  (``model.save_pretrained(path)``, or a downloaded snapshot directory) with
  ``local_files_only=True``: a path that is not a directory is refused with what to do,
  and nothing is fetched from the Hugging Face Hub.

YAML: ``teacher: {name: causal_lm, architecture: llama, hidden_size: 256, ...}``,
``teacher: {name: causal_lm, path: /models/my-teacher}``, or
``teacher: {_component_: transformers.LlamaConfig, hidden_size: 256, ...}``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import MissingExtraError, ModelNotFoundError

TEXT_EXTRA = 'pip install "kdistill[text]"'


def require_transformers():
    """The ``transformers`` module, or an ImportError saying how to install it."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the extra is installed in the tests
        raise MissingExtraError(f"language models need the transformers library: {TEXT_EXTRA}") from e
    return transformers


def load_causal_lm(path: str | os.PathLike, *, dtype: Any = None, **kwargs: Any) -> nn.Module:
    """A causal LM saved on this machine (``AutoModelForCausalLM.from_pretrained(path,
    local_files_only=True)``).

    Args:
        path: the directory holding ``config.json`` and the weights.
        dtype: the parameters' dtype (``"bfloat16"``, ``torch.float16``, ...); default:
            float32, the dtype kdistill trains in (``precision`` autocasts the forward).
        **kwargs: passed to ``from_pretrained`` (e.g. ``attn_implementation``).

    Raises:
        ModelNotFoundError: ``path`` is not a directory holding a model's ``config.json``
            (a ``FileNotFoundError``).
    """
    transformers = require_transformers()
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "has no config.json"
        raise ModelNotFoundError(
            f"no causal language model at {folder} (the folder {what}). kdistill never downloads models: "
            "give the directory a model was saved to (model.save_pretrained(path)), or a snapshot you "
            "downloaded beforehand (huggingface-cli download NAME --local-dir PATH)")
    if dtype is not None:
        kwargs["dtype"] = dtype
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, **kwargs)


def causal_lm(
    architecture: str | None = None,
    *,
    path: str | os.PathLike | None = None,
    config: Any = None,
    vocab_size: int | None = None,
    **config_kwargs: Any,
) -> nn.Module:
    """A causal language model: built from a configuration, or loaded from ``path``.

    Args:
        architecture: a ``transformers`` model type (``"llama"``, ``"qwen2"``, ``"gpt2"``,
            ``"mistral"``, ...) whose configuration ``config_kwargs`` fill in.
        path: instead, a directory holding a saved model (:func:`load_causal_lm`).
        config: instead of ``architecture``, a ``transformers.PretrainedConfig``.
        vocab_size: the tokenizer's vocabulary size (the runner passes it); with ``path``
            it must equal the model's, or be left out.
        **config_kwargs: configuration keys (``hidden_size``, ``num_hidden_layers``, ...).

    Returns:
        A ``transformers.PreTrainedModel`` for causal LM, in float32.

    Raises:
        ValueError: none or several of architecture/path/config given, an unknown
            architecture, or a vocabulary that does not fit the tokenizer.
    """
    given = [n for n, v in (("architecture", architecture), ("path", path), ("config", config)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"causal_lm takes exactly one of architecture, path or config; got {given or 'none'}")
    transformers = require_transformers()
    if path is not None:
        if config_kwargs:
            raise ValueError(f"causal_lm(path=...) loads a saved model; {sorted(config_kwargs)} configure a new one")
        model = load_causal_lm(path)
        size = model.get_input_embeddings().num_embeddings
        if vocab_size is not None and size < vocab_size:
            raise ValueError(
                f"the model at {path} has {size} token embeddings but the tokenizer {vocab_size} tokens: "
                "use the tokenizer saved with the model")
        return model
    if architecture is not None:
        try:
            config = transformers.AutoConfig.for_model(architecture, **config_kwargs)
        except ValueError as e:
            raise ValueError(f"unknown causal LM architecture {architecture!r} ({e})") from None
    elif config_kwargs:
        config = config.__class__(**{**config.to_dict(), **config_kwargs})
    return model_from_config(config, vocab_size=vocab_size)


def model_from_config(config: Any, *, vocab_size: int | None = None) -> nn.Module:
    """A randomly initialised causal LM for ``config`` (a ``PretrainedConfig``), with the
    tokenizer's ``vocab_size`` when given, and special token ids outside it dropped."""
    transformers = require_transformers()
    if vocab_size is not None:
        config.vocab_size = int(vocab_size)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= config.vocab_size:
            setattr(config, key, None)  # e.g. GPT-2's default 50256 in a small vocabulary
    return transformers.AutoModelForCausalLM.from_config(config)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face model that can ``generate``."""
    return hasattr(model, "config") and callable(getattr(model, "generate", None))
