"""Built-in models for DiLoCo jobs and the mapping from a data slice to a loss.

Owns two tiny built-in models (a byte-level GPT-style causal LM and an MLP classifier),
``build_model`` that turns a job's model name and options into a seeded ``nn.Module``,
``build_hf_model`` for a local Hugging Face config directory, ``check_task_model`` (build on
the meta device, count and limit the parameters: what ``hypha job validate`` and the
scheduler run before any trainer), and ``batch_loss`` that feeds a slice batch to a model.
It does not own optimizers, data loading or the training loop (``training/diloco.py`` and
the trainer session do).

Shape legend: B batch, T sequence length, D model dim, H heads, V vocab, C classes.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hypha.protocol.tasks import ModelDoc

logger = logging.getLogger(__name__)

MODEL_NAMES = ("gpt", "mlp")
MAX_NUM_LAYERS: Final = 1_000
"""Deeper built-in models are a typo (and would take minutes just to construct)."""
MAX_MODEL_PARAMETERS: Final = 10_000_000_000
"""Larger models are refused before any trainer starts: no worker could hold them."""


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the built-in causal LM ``TinyGPT``."""

    vocab_size: int = 256
    """Number of token ids; 256 fits byte-level text."""
    seq_len: int = 64
    """Longest input the learned position embedding covers."""
    num_layers: int = 2
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads per block; must divide ``dim``."""
    dim: int = 128
    """Residual stream width."""
    dropout: float = 0.0
    """Dropout on attention and MLP outputs (0 keeps runs bit-reproducible)."""

    def __post_init__(self) -> None:
        for key in ("vocab_size", "seq_len", "num_layers", "num_heads", "dim"):
            if getattr(self, key) <= 0:
                raise ValueError(f"gpt option {key} must be positive, got {getattr(self, key)}")
        if self.num_layers > MAX_NUM_LAYERS:
            raise ValueError(f"gpt option num_layers must be at most {MAX_NUM_LAYERS}, got {self.num_layers}")
        if self.dim % self.num_heads != 0:
            raise ValueError(f"gpt option dim={self.dim} must divide by num_heads={self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"gpt option dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class MLPConfig:
    """Shape of the built-in classifier ``MLPClassifier``."""

    input_dim: int = 32
    """Features per sample."""
    hidden_dim: int = 64
    """Width of each hidden layer."""
    num_classes: int = 10
    """Number of output classes."""
    num_layers: int = 2
    """Number of linear layers, the output layer included (1 is logistic regression)."""

    def __post_init__(self) -> None:
        for key in ("input_dim", "hidden_dim", "num_classes", "num_layers"):
            if getattr(self, key) <= 0:
                raise ValueError(f"mlp option {key} must be positive, got {getattr(self, key)}")
        if self.num_layers > MAX_NUM_LAYERS:
            raise ValueError(f"mlp option num_layers must be at most {MAX_NUM_LAYERS}, got {self.num_layers}")


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal mask (flash/SDPA kernel where available)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)

    def forward(self, x_btd: Tensor) -> Tensor:
        b, t, d = x_btd.shape
        head_dim = d // self.num_heads
        qkv_btd3 = self.qkv(x_btd)  # [B, T, 3D]
        q, k, v = qkv_btd3.split(d, dim=2)  # 3 x [B, T, D]
        q_bhtk = q.view(b, t, self.num_heads, head_dim).transpose(1, 2)  # [B, H, T, D/H]
        k_bhtk = k.view(b, t, self.num_heads, head_dim).transpose(1, 2)  # [B, H, T, D/H]
        v_bhtk = v.view(b, t, self.num_heads, head_dim).transpose(1, 2)  # [B, H, T, D/H]
        drop = self.dropout if self.training else 0.0
        y_bhtk = F.scaled_dot_product_attention(
            q_bhtk, k_bhtk, v_bhtk, dropout_p=drop, is_causal=True
        )  # [B, H, T, D/H]
        y_btd = y_bhtk.transpose(1, 2).contiguous().view(b, t, d)  # [B, T, D]
        out: Tensor = self.proj(y_btd)  # [B, T, D]
        return out


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.dim)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.dim)
        self.mlp = nn.Sequential(
            nn.Linear(config.dim, 4 * config.dim),
            nn.GELU(),
            nn.Linear(4 * config.dim, config.dim),
        )
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x_btd: Tensor) -> Tensor:
        x_btd = x_btd + self.drop(self.attn(self.ln_1(x_btd)))  # [B, T, D]
        x_btd = x_btd + self.drop(self.mlp(self.ln_2(x_btd)))  # [B, T, D]
        return x_btd


class TinyGPT(nn.Module):
    """A small GPT-style causal LM with learned positions and a tied output head.

    ``forward(input_ids, labels)`` shifts internally, like Hugging Face causal LMs: the
    logits at position t predict ``labels[:, t + 1]``, so a slice of ``input_ids`` with shape
    [N, seq_len] trains on seq_len - 1 targets per row, and ``labels`` is normally
    ``input_ids`` itself. Label value -100 is ignored.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.dim)
        self.wpe = nn.Embedding(config.seq_len, config.dim)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.dim)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017)
        self.apply(_init_weights)
        # GPT-2 scales residual projections by 1/sqrt(2 * layers) so depth keeps variance.
        for name, param in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.num_layers))

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Compute next-token logits and, with ``labels``, the mean cross-entropy.

        Args:
            input_ids: Token ids, shape [B, T] with T <= ``config.seq_len``.
            labels: Unshifted targets, shape [B, T] (usually ``input_ids``), or None.

        Returns:
            ``(logits [B, T, V], loss)``; the loss covers positions 0..T-2 and is None
            without labels.

        Raises:
            ValueError: If the input is not 2-D or longer than ``seq_len``.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        _, t = input_ids.shape
        if t > self.config.seq_len:
            raise ValueError(f"sequence length {t} exceeds gpt seq_len {self.config.seq_len}")
        pos_t = torch.arange(t, device=input_ids.device)  # [T]
        x_btd = self.drop(self.wte(input_ids) + self.wpe(pos_t))  # [B, T, D]
        for block in self.blocks:
            x_btd = block(x_btd)  # [B, T, D]
        logits_btv: Tensor = self.lm_head(self.ln_f(x_btd))  # [B, T, V]
        if labels is None:
            return logits_btv, None
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != {tuple(input_ids.shape)}")
        shift_logits = logits_btv[:, :-1, :].reshape(-1, logits_btv.size(-1))  # [B*(T-1), V]
        shift_labels = labels[:, 1:].reshape(-1)  # [B*(T-1)]
        loss = F.cross_entropy(shift_logits.float(), shift_labels, ignore_index=-100)  # []
        return logits_btv, loss


class MLPClassifier(nn.Module):
    """A ReLU multilayer perceptron classifier over flat float features."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width = config.input_dim
        for _ in range(config.num_layers - 1):
            layers += [nn.Linear(width, config.hidden_dim), nn.ReLU()]
            width = config.hidden_dim
        layers.append(nn.Linear(width, config.num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, inputs: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Compute class logits and, with ``labels``, the mean cross-entropy.

        Args:
            inputs: Features, float, shape [B, input_dim].
            labels: Class ids, long, shape [B], or None.

        Returns:
            ``(logits [B, C], loss)``; the loss is None without labels.
        """
        logits_bc: Tensor = self.net(inputs)  # [B, C]
        if labels is None:
            return logits_bc, None
        loss = F.cross_entropy(logits_bc.float(), labels)  # []
        return logits_bc, loss


def _init_weights(module: nn.Module) -> None:
    """GPT-2 style init: N(0, 0.02) for linear and embedding weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


def _make_config(config_cls: type[Any], name: str, options: Mapping[str, int | float]) -> Any:
    """Build ``config_cls`` from options, rejecting unknown keys and wrong types."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    kwargs: dict[str, int | float] = {}
    for key, value in options.items():
        if key not in fields:
            raise ValueError(f"unknown option {key!r} for model {name!r}; known: {sorted(fields)}")
        wants_int = fields[key].type in (int, "int")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"model {name!r} option {key!r} must be a number, got {value!r}")
        if wants_int and not (isinstance(value, int) or float(value).is_integer()):
            raise ValueError(f"model {name!r} option {key!r} must be an integer, got {value!r}")
        # Options travel as JSON/TOML numbers: 64.0 is the integer 64.
        kwargs[key] = int(value) if wants_int else float(value)
    return config_cls(**kwargs)


def build_model(name: str, options: Mapping[str, int | float], seed: int = 0) -> nn.Module:
    """Build a built-in model with deterministic initial weights.

    The global torch RNG is forked, so building a model does not disturb the caller's RNG.

    Args:
        name: ``"gpt"`` (``TinyGPT``) or ``"mlp"`` (``MLPClassifier``).
        options: Overrides of ``GPTConfig`` or ``MLPConfig`` fields.
        seed: Seed for the initial weights; equal seeds give equal weights.

    Returns:
        The model, in float32 on the CPU, in training mode.

    Raises:
        ValueError: For an unknown model name, an unknown option, or a bad option value.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "gpt":
            return TinyGPT(_make_config(GPTConfig, name, options))
        if name == "mlp":
            return MLPClassifier(_make_config(MLPConfig, name, options))
    raise ValueError(f"unknown model {name!r}; built-in models: {', '.join(MODEL_NAMES)}")


def build_hf_model(config_dir: Path, seed: int = 0) -> nn.Module:
    """Build a freshly initialised Hugging Face causal LM from a local config directory.

    Nothing is downloaded: only ``config_dir/config.json`` is read.

    Args:
        config_dir: A directory holding a Hugging Face ``config.json``.
        seed: Seed for the initial weights.

    Returns:
        The ``AutoModelForCausalLM`` built with ``from_config``.

    Raises:
        ValueError: If ``transformers`` is not installed or ``config.json`` is missing.
    """
    try:
        transformers = importlib.import_module("transformers")
    except ImportError as exc:
        raise ValueError(
            f"model directory {config_dir} needs the 'transformers' package, which is not "
            "installed; install it or use a built-in model (gpt, mlp)"
        ) from exc
    if not (config_dir / "config.json").is_file():
        raise ValueError(f"{config_dir} holds no config.json")
    config = transformers.AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: nn.Module = transformers.AutoModelForCausalLM.from_config(config)
    logger.info("built Hugging Face model %s from %s", type(model).__name__, config_dir)
    return model


def build_task_model(model: ModelDoc, seed: int, base_dir: Path) -> nn.Module:
    """Build the model a task document names; trainers and the parameter server both call it.

    Args:
        model: The task's model section (a built-in name and options, or ``kind = "hf"``
            with a config directory; a relative ``path`` is taken from ``base_dir``).
        seed: Seed for the initial weights.
        base_dir: Where a relative Hugging Face ``path`` starts.

    Raises:
        ValueError: Unknown model, bad options, or an unusable config directory.
    """
    if model.kind == "hf":
        if not model.path:
            raise ValueError("model kind 'hf' needs a path to a Hugging Face config directory")
        return build_hf_model(base_dir / model.path, seed=seed)  # an absolute path stays
    options = {k: int(v) if float(v).is_integer() else v for k, v in model.options.items()}
    return build_model(model.name, options, seed=seed)


def check_task_model(model: ModelDoc, base_dir: Path) -> int:
    """Build the model a task document names on the meta device; return its parameter count.

    Nothing is allocated and no weights are drawn, so this is cheap for any size: it is the
    check a job gets before any trainer starts (unknown names and options, bad values,
    models too large). A Hugging Face ``path`` that is relative is left to the trainers,
    which take it from their own task directory.

    Args:
        model: The task's model section.
        base_dir: Where a relative Hugging Face ``path`` would start.

    Raises:
        ValueError: What ``build_task_model`` raises, or a model with more than
            ``MAX_MODEL_PARAMETERS`` parameters.
    """
    if model.kind == "hf" and model.path and not Path(model.path).is_absolute():
        return 0
    what = model.path if model.kind == "hf" else model.name
    try:
        with torch.device("meta"):
            module = build_task_model(model, seed=0, base_dir=base_dir)
    except RuntimeError as exc:  # a tensor whose byte size overflows int64
        raise ValueError(
            f"model {what!r} is too large to build ({exc}); the limit is {MAX_MODEL_PARAMETERS:_} parameters"
        ) from None
    count = sum(p.numel() for p in module.parameters())
    if count > MAX_MODEL_PARAMETERS:
        raise ValueError(
            f"model {what!r} has {count:_} parameters, more than the limit of {MAX_MODEL_PARAMETERS:_}"
        )
    return count


def _require(batch: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in batch:
        raise ValueError(f"batch has no {key!r} tensor; keys: {sorted(batch)}")
    return batch[key]


def batch_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Feed one slice batch to ``model`` and return its scalar training loss.

    ``TinyGPT`` and Hugging Face causal LMs read ``input_ids`` [B, T] (labels are the
    inputs, shifted inside the model); ``MLPClassifier`` reads ``inputs`` [B, input_dim] and
    ``labels`` [B]. Tensors move to the model's device; ids and labels become int64 and
    features the model's float dtype.

    Raises:
        ValueError: If a tensor the model needs is missing from ``batch``.
    """
    param = next(model.parameters())
    if isinstance(model, MLPClassifier):
        inputs = _require(batch, "inputs").to(param.device, param.dtype)  # [B, input_dim]
        labels = _require(batch, "labels").to(param.device, torch.long)  # [B]
        _, loss = model(inputs, labels)
    elif isinstance(model, TinyGPT):
        ids = _require(batch, "input_ids").to(param.device, torch.long)  # [B, T]
        _, loss = model(ids, ids)
    else:  # Hugging Face: returns a ModelOutput with .loss
        ids = _require(batch, "input_ids").to(param.device, torch.long)  # [B, T]
        loss = model(input_ids=ids, labels=ids).loss
    assert isinstance(loss, Tensor)
    return loss
