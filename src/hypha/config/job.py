"""The job spec: what a scheduler trains, with what, on whom, and where results go.

Owns the TOML shape of ``hypha scheduler --job JOB.toml`` and ``hypha job validate``: one
frozen dataclass per table, every field documented, checked with the same loader as node
configs (unknown keys, wrong types and non-finite numbers are errors naming the key and
file), and the ranges a job must keep to (the ``MAX_*`` limits below, safe names, a warmup
that fits the inner steps). Whether the model can be built is ``scheduler.documents``'s
``check_job`` (it needs torch, which config does not import).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from hypha.config.load import build_section, toml_key
from hypha.config.schema import doc
from hypha.data.manifest import is_valid_name
from hypha.errors import ConfigError
from hypha.protocol.names import UnsafeNameError, check_name, is_sha256

ModelKind = Literal["builtin", "hf"]

MAX_ROUNDS: Final = 1_000_000
MAX_SAMPLES_PER_ROUND: Final = 1_000_000_000
MAX_BATCH_SIZE: Final = 1_000_000
MAX_INNER_STEPS_PER_ROUND: Final = 1_000_000
MAX_EVAL_BATCHES: Final = 1_000_000
MAX_POOL_TARGET: Final = 10_000
MAX_INNER_LR: Final = 1.0
"""AdamW diverges far below this; a larger rate is a typo."""
MAX_OUTER_LR: Final = 10.0
"""DiLoCo uses 0.7; Nesterov outer steps above a few times the pseudo-gradient make no sense."""
MAX_SEED: Final = 2**63 - 1


def _check_range(
    section: object, key: str, low: float, high: float | None = None, *, open_low: bool = False
) -> None:
    """Raise ``ValueError`` naming ``key`` unless low <= value <= high (low < value if open_low).

    Written so that NaN fails too (specs built in Python skip the loader's finiteness check).
    """
    value = getattr(section, key)
    above_low = value > low if open_low else value >= low
    if not (above_low and (high is None or value <= high)):
        bound = f"> {_number(low)}" if open_low else f">= {_number(low)}"
        if high is not None:
            bound += f" and <= {_number(high)}"
        raise ValueError(f"{key}: must be {bound}, got {value!r}")


def _number(value: float) -> str:
    return f"{value:_}" if isinstance(value, int) else f"{value:g}"


@dataclass(frozen=True)
class ModelSection:
    kind: ModelKind = doc(
        "'builtin' (name: gpt or mlp) or 'hf' (a local Hugging Face config dir).", "builtin"
    )
    name: str = doc("Built-in model name: 'gpt' (causal LM) or 'mlp' (classifier).", "gpt")
    path: Path | None = doc("Directory with config.json for kind = 'hf' (built with from_config).", None)
    options: dict[str, float] = doc("Model options, e.g. {dim = 64, num_layers = 2}.", default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind == "hf" and self.path is None:
            raise ValueError("path: required when kind = 'hf'")


@dataclass(frozen=True)
class InnerSection:
    """AdamW on every trainer."""

    lr: float = doc("Peak learning rate.", 1e-3)
    beta1: float = doc("AdamW beta1.", 0.9)
    beta2: float = doc("AdamW beta2.", 0.95)
    weight_decay: float = doc("AdamW weight decay.", 0.1)
    warmup_steps: int = doc("Linear warmup steps.", 10)
    schedule: Literal["cosine", "constant"] = doc("Learning-rate schedule after warmup.", "cosine")

    def __post_init__(self) -> None:
        _check_range(self, "lr", 0.0, MAX_INNER_LR, open_low=True)
        for key in ("beta1", "beta2"):
            _check_range(self, key, 0.0)
            if not getattr(self, key) < 1.0:
                raise ValueError(f"{key}: must be < 1, got {getattr(self, key)!r}")
        _check_range(self, "weight_decay", 0.0, 1.0)
        _check_range(self, "warmup_steps", 0)


@dataclass(frozen=True)
class OuterSection:
    """Nesterov momentum on the parameter server."""

    lr: float = doc("Outer learning rate.", 0.7)
    momentum: float = doc("Outer Nesterov momentum.", 0.9)

    def __post_init__(self) -> None:
        _check_range(self, "lr", 0.0, MAX_OUTER_LR, open_low=True)
        _check_range(self, "momentum", 0.0)
        if not self.momentum < 1.0:
            raise ValueError(f"momentum: must be < 1, got {self.momentum!r}")


@dataclass(frozen=True)
class ResourceNeeds:
    gpu: float = doc("GPU memory in GB.", 0.0)
    cpu: float = doc("CPU cores.", 1.0)
    memory: float = doc("Memory in GB.", 1.0)
    storage: float = doc("Disk in GB.", 0.0)

    def __post_init__(self) -> None:
        for key in ("gpu", "cpu", "memory", "storage"):
            _check_range(self, key, 0.0)


@dataclass(frozen=True)
class PoolSection:
    """A pool of workers of one kind."""

    executor: str = doc("Executor name the workers must offer.", "diloco")
    min: int = doc("Fewest members before the job is in danger.", 1)
    target: int = doc("Members to keep leased.", 2)
    grace_seconds: float = doc("How long the pool may stay below min before the job fails.", 60.0)
    bid: float = doc("Price offered per lease (public).", 1.0)
    max_price: float = doc("Highest price accepted (private).", 10.0)
    resources: ResourceNeeds = doc("Resources each member needs.", default_factory=ResourceNeeds)
    max_task_failures: int = doc(
        "Trainer tasks failing with the same error this often fail the job; a worker whose tasks "
        "failed this often is not leased again for it.",
        3,
    )

    def __post_init__(self) -> None:
        _check_range(self, "max_task_failures", 1, 1000)
        if not self.executor:
            raise ValueError("executor: must not be empty")
        _check_range(self, "target", 0, MAX_POOL_TARGET)
        if not 0 <= self.min <= self.target:
            raise ValueError(f"min: need 0 <= min <= target, got min = {self.min}, target = {self.target}")
        for key in ("grace_seconds", "bid", "max_price"):
            _check_range(self, key, 0.0)
        if self.bid > self.max_price:
            raise ValueError("bid: must not exceed max_price")


@dataclass(frozen=True)
class ParameterServerPool(PoolSection):
    """The parameter server's pool: exactly one member, so a table need not say so."""

    executor: str = doc("Executor name the worker must offer.", "parameter-server")
    min: int = doc("Fewest members (1: the job cannot run without its server).", 1)
    target: int = doc("Members to keep leased (exactly 1 is supported).", 1)


@dataclass(frozen=True)
class CheckpointSection:
    """Where and how often the parameter server checkpoints the job (weights, outer state, round).

    S3 credentials come from the parameter server worker's environment (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``), never from the job spec.
    """

    store: str = doc(
        "'' (no checkpoints), an absolute directory on the parameter server's machine, or "
        "s3://bucket/prefix.",
        "",
    )
    every_rounds: int = doc("Checkpoint after every this many closed rounds (and after the last).", 5)
    keep_last_n: int = doc("Committed checkpoints kept; older ones are deleted.", 3)
    compress: Literal["none", "zstd"] = doc("Compression of the checkpoint data.", "none")
    endpoint_url: str | None = doc(
        "S3 endpoint (for S3-compatible stores), e.g. http://127.0.0.1:9000.", None
    )
    region: str | None = doc("S3 region.", None)

    def __post_init__(self) -> None:
        if self.store and not (self.store.startswith("s3://") or Path(self.store).is_absolute()):
            raise ValueError(f"store: {self.store!r} must be '', an absolute directory or s3://bucket/prefix")
        _check_range(self, "every_rounds", 1, MAX_ROUNDS)
        _check_range(self, "keep_last_n", 1, 1000)


@dataclass(frozen=True)
class JobSpec:
    """A DiLoCo training job."""

    name: str = doc("Job name; also the default output directory runs/<name>.", "job")
    dataset: str = doc("Dataset name announced by a data node.", "stdlib-text")
    dataset_sha256: str | None = doc(
        "Pin the dataset: the sha256 of its manifest; any other manifest under that name is refused.",
        None,
    )
    rounds: int = doc("Outer rounds (synchronisations).", 10)
    samples_per_round: int = doc("Samples all trainers together process per round.", 1024)
    batch_size: int = doc("Samples per inner batch on each trainer.", 16)
    seed: int = doc("Seed of the initial weights and data order.", 0)
    encoding: Literal["fp32", "fp16", "int8"] = doc("Encoding of pseudo-gradients and weights.", "fp32")
    output_dir: Path | None = doc("Where results go (default runs/<name>).", None)
    report_every_seconds: float = doc("How often trainers report progress.", 0.25)
    sync_horizon_seconds: float = doc("Plan the sync once the round would end within this time.", 1.0)
    round_deadline_seconds: float = doc(
        "After the first update, close a round with what arrived (if >= trainers.min) after this long.",
        120.0,
    )
    eval_batches: int = doc("Held-out batches the parameter server evaluates per round.", 4)
    fixed_inner_steps: int | None = doc(
        "Baseline mode: every trainer runs exactly this many batches per round (no planner).", None
    )
    model: ModelSection = doc("The model.", default_factory=ModelSection)
    inner: InnerSection = doc("Inner optimizer.", default_factory=InnerSection)
    outer: OuterSection = doc("Outer optimizer.", default_factory=OuterSection)
    trainers: PoolSection = doc("Trainer pool.", default_factory=PoolSection)
    parameter_server: ParameterServerPool = doc(
        "Parameter server pool (target 1).", default_factory=ParameterServerPool
    )
    lease_seconds: float | None = doc("Override the scheduler's lease lifetime for this job.", None)
    checkpoint: CheckpointSection = doc("Parameter-server checkpoints.", default_factory=CheckpointSection)

    def __post_init__(self) -> None:
        for key, what in (("name", "job name"), ("dataset", "dataset name")):
            try:
                check_name(getattr(self, key), what)
            except UnsafeNameError as exc:
                raise ValueError(f"{key}: {exc}") from None
        if not is_valid_name(self.dataset):  # what a data node can serve (``hypha data prepare``)
            raise ValueError(f"dataset: {self.dataset!r} must start with a letter or a digit")
        _check_range(self, "rounds", 1, MAX_ROUNDS)
        _check_range(self, "samples_per_round", 1, MAX_SAMPLES_PER_ROUND)
        _check_range(self, "batch_size", 1, MAX_BATCH_SIZE)
        _check_range(self, "seed", 0, MAX_SEED)
        if self.fixed_inner_steps is not None:
            _check_range(self, "fixed_inner_steps", 1, MAX_INNER_STEPS_PER_ROUND)
        _check_range(self, "eval_batches", 0, MAX_EVAL_BATCHES)
        for key in ("report_every_seconds", "round_deadline_seconds"):
            _check_range(self, key, 0.0, open_low=True)
        _check_range(self, "sync_horizon_seconds", 0.0)
        if self.lease_seconds is not None:
            _check_range(self, "lease_seconds", 0.0, open_low=True)
        if self.dataset_sha256 is not None and not is_sha256(self.dataset_sha256):
            raise ValueError("dataset_sha256: must be 64 lowercase hex digits (a manifest's sha256)")
        if self.parameter_server.target != 1:
            raise ValueError("parameter_server.target: exactly one parameter server is supported")
        total = self.total_inner_steps
        if self.inner.schedule == "cosine" and self.inner.warmup_steps > total:
            raise ValueError(
                f"inner.warmup_steps: {self.inner.warmup_steps} is more than the {total} inner "
                "steps each trainer is planned to run (rounds x inner steps per round); lower it "
                "or use schedule = 'constant'"
            )

    @property
    def out(self) -> Path:
        return self.output_dir if self.output_dir is not None else Path("runs") / self.name

    @property
    def total_inner_steps(self) -> int:
        """Inner steps each trainer is told it runs over the whole job (its LR schedule's length).

        ``fixed_inner_steps`` per round, else an even share of ``samples_per_round`` in
        batches among ``trainers.target`` trainers; at least 1.
        """
        per_trainer = self.samples_per_round // (self.batch_size * max(1, self.trainers.target))
        return max(1, self.rounds * (self.fixed_inner_steps or per_trainer))


def load_job(path: Path) -> JobSpec:
    """Load and check a job spec; ``ConfigError`` lists every problem with its key."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"job file {path} does not exist") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return build_section(JobSpec, raw, where=str(path), base=path.resolve().parent)


def job_to_dict(spec: JobSpec) -> dict[str, Any]:
    """The spec as the TOML-shaped table ``load_job`` reads (paths as strings, unset keys left out)."""
    return _table(spec)


def _table(section: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if value is None:
            continue
        if dataclasses.is_dataclass(value):
            value = _table(value)
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, dict):
            value = dict(value)
        doc[toml_key(f.name)] = value
    return doc


def job_from_dict(doc: dict[str, Any], origin: str = "saved job") -> JobSpec:
    """Rebuild a spec from ``job_to_dict``'s table, with the same checks as ``load_job``.

    Raises:
        ConfigError: The table does not describe a valid job (every problem listed).
    """
    return build_section(JobSpec, doc, where=origin)
