"""Every message that crosses a process boundary over the P2P network.

Messages are frozen msgspec Structs tagged by ``kind``. Requests and responses come in
``XRequest``/``XResponse`` pairs where a pair exists; records are plain nouns. Times on the
wire (``expires_at``) are UNIX seconds because peers do not share a monotonic clock; each
side converts to its own ``trio.current_time()`` on receipt. Bridge bodies (executor <->
worker over HTTP) live in ``protocol/bridge.py``; this module knows nothing of transports.

Over 400 lines: it is the protocol's one reference, every wire message in one flat list next
to the ``Message`` union the codec decodes; split up, the schema would have to be read in
pieces to see what a peer may send.
"""

from __future__ import annotations

from typing import Literal

import msgspec

ExecutorClass = Literal["train", "aggregate"]
TaskState = Literal["running", "finished", "failed", "cancelled"]
Encoding = Literal["fp32", "fp16", "int8"]
Purpose = Literal["slice", "update", "weights", "file"]


class Msg(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """Base of every wire message; subclasses get a ``kind`` tag from their class name."""


class ResourceSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Wire form of a resource amount (``hypha.resources.Resources`` does the arithmetic)."""

    gpu: float = 0.0
    cpu: float = 0.0
    memory: float = 0.0
    storage: float = 0.0


class ExecutorDescriptor(msgspec.Struct, frozen=True, kw_only=True):
    """Which kind of executor a task needs: ``class`` train|aggregate and a name."""

    executor_class: ExecutorClass = msgspec.field(name="class")
    name: str


# --- generic ---------------------------------------------------------------------------


class Ack(Msg, frozen=True, kw_only=True):
    """Plain acknowledgement."""


class ErrorResponse(Msg, frozen=True, kw_only=True):
    """A request failed; ``code`` is machine readable, ``detail`` is for people."""

    code: str
    detail: str


class HealthRequest(Msg, frozen=True, kw_only=True):
    """Is the node up?"""


class HealthResponse(Msg, frozen=True, kw_only=True):
    healthy: bool
    role: str
    peer_id: str


class EchoRequest(Msg, frozen=True, kw_only=True):
    """Diagnostics: the node answers with the same payload."""

    payload: str


class EchoResponse(Msg, frozen=True, kw_only=True):
    payload: str


# --- allocation (ARCHITECTURE.md section 5) --------------------------------------------


class WorkerRequest(Msg, frozen=True, kw_only=True):
    """A scheduler's advertisement on the ``hypha/worker`` topic."""

    id: str
    scheduler: str
    resources: ResourceSpec
    executors: list[ExecutorDescriptor]
    bid: float
    expires_at: float
    addresses: list[str] = msgspec.field(default_factory=list)
    """The scheduler's multiaddrs, so workers can answer it directly."""


class OfferRequest(Msg, frozen=True, kw_only=True):
    """A worker offers to serve a ``WorkerRequest``; answered by ``OfferDecision``."""

    lease_id: str
    request_id: str
    worker: str
    price: float
    resources: ResourceSpec
    expires_at: float


class OfferDecision(Msg, frozen=True, kw_only=True):
    """The scheduler's explicit answer to an offer."""

    lease_id: str
    accepted: bool
    lease_seconds: float = 0.0


class RenewLeaseRequest(Msg, frozen=True, kw_only=True):
    lease_id: str


class LeaseRenewed(Msg, frozen=True, kw_only=True):
    lease_id: str
    lease_seconds: float


class LeaseGone(Msg, frozen=True, kw_only=True):
    lease_id: str
    reason: str


class ReleaseLeaseRequest(Msg, frozen=True, kw_only=True):
    lease_id: str


# --- work -------------------------------------------------------------------------------


class DispatchTask(Msg, frozen=True, kw_only=True):
    """Start a task under a lease. ``config`` is the task's JSON document (see training)."""

    lease_id: str
    task_id: str
    job_id: str
    executor: ExecutorDescriptor
    config: bytes


class Dispatched(Msg, frozen=True, kw_only=True):
    task_id: str


class Refused(Msg, frozen=True, kw_only=True):
    reason: str


class TaskStatus(Msg, frozen=True, kw_only=True):
    """A task changed state (worker -> scheduler)."""

    task_id: str
    job_id: str
    state: TaskState
    exit_code: int | None = None
    detail: str = ""
    code: str = ""
    """For ``failed``: a stable code from ``protocol/codes.py`` (``executor_start`` when the
    executor could not be started at all); empty when the executor itself failed."""


# --- training progress ------------------------------------------------------------------


class BatchesDone(Msg, frozen=True, kw_only=True):
    """Several inner batches finished since the last report."""

    round: int
    batches: int
    samples: int
    seconds: float
    loss: float | None = None
    slices_done: list[int] = msgspec.field(default_factory=list)
    """Dataset slices fully consumed since the last report (they become USED)."""


class UpdateSent(Msg, frozen=True, kw_only=True):
    round: int
    samples: int


class UpdateApplied(Msg, frozen=True, kw_only=True):
    round: int


class Metrics(Msg, frozen=True, kw_only=True):
    round: int
    values: dict[str, float]


ProgressEvent = BatchesDone | UpdateSent | UpdateApplied | Metrics


class ProgressRequest(Msg, frozen=True, kw_only=True):
    """Progress of one task, relayed by its worker to the scheduler."""

    job_id: str
    task_id: str
    event: ProgressEvent


class Continue(Msg, frozen=True, kw_only=True):
    """Keep running inner steps."""


class SyncAfter(Msg, frozen=True, kw_only=True):
    """Run ``batches`` more batches, then send the pseudo-gradient of ``round``."""

    round: int
    batches: int


class Done(Msg, frozen=True, kw_only=True):
    """The job is over; exit."""


Instruction = Continue | SyncAfter | Done


class RoundClosed(Msg, frozen=True, kw_only=True):
    """The parameter server applied the outer step of ``round`` (PS -> scheduler)."""

    job_id: str
    round: int
    num_updates: int
    samples: int
    loss: float | None = None
    checkpoint: str = ""
    """The newest committed checkpoint ("" while none is): its name in the job's store."""


class ParameterServerReady(Msg, frozen=True, kw_only=True):
    """The parameter server serves the weights of ``round`` (PS -> scheduler).

    Sent once a server has started; a replacement that resumed from a checkpoint names the
    round it resumed at, and the job goes on from there.
    """

    job_id: str
    round: int


class RoundPlan(Msg, frozen=True, kw_only=True):
    """The scheduler tells the parameter server which trainers' updates ``round`` expects."""

    job_id: str
    round: int
    trainers: list[str]
    min_updates: int
    max_samples: int = 0
    """Most samples one trainer's update may claim this round (0: no bound given)."""


class JobMemberRequest(Msg, frozen=True, kw_only=True):
    """A worker asks a job's scheduler whether ``peer`` currently holds a task in ``job_id``."""

    job_id: str
    peer: str


class JobMemberResponse(Msg, frozen=True, kw_only=True):
    member: bool


class WeightsRequest(Msg, frozen=True, kw_only=True):
    """A trainer's worker asks the parameter server for the current global weights."""

    job_id: str
    round: int | None = None


class JobFinished(Msg, frozen=True, kw_only=True):
    """The scheduler tells the parameter server the job is over (it sends the final model)."""

    job_id: str


# --- data -------------------------------------------------------------------------------


class DatasetRecord(Msg, frozen=True, kw_only=True):
    """The DHT value under ``/hypha/dataset/<name>``, signed by the data node announcing it.

    ``signature`` is the announcer's Ed25519 signature (its libp2p identity key) over the
    canonical encoding of (key, name, num_slices, manifest_sha256, peer_id) that
    ``hypha.net.records`` defines; ``certificate`` (DER) is the announcer's CA-signed
    certificate, which names its role and carries that key. Readers refuse a record whose
    certificate does not chain to their CA, is revoked, names another role than ``data`` or
    another peer than ``peer_id``, or whose signature does not verify.
    """

    name: str
    num_slices: int
    manifest_sha256: str
    peer_id: str
    certificate: bytes
    signature: bytes


class ManifestRequest(Msg, frozen=True, kw_only=True):
    dataset: str


class ManifestResponse(Msg, frozen=True, kw_only=True):
    """The dataset's ``manifest.json`` bytes, exactly as written by ``hypha data prepare``."""

    dataset: str
    manifest: bytes


class SliceRequest(Msg, frozen=True, kw_only=True):
    """Ask a data node for one slice; answered by a ``TensorOffer`` for its bytes."""

    dataset: str
    index: int


class NextSliceRequest(Msg, frozen=True, kw_only=True):
    """A worker asks its scheduler which slice to train on next."""

    job_id: str
    dataset: str


class SliceHint(msgspec.Struct, frozen=True, kw_only=True):
    """A slice the scheduler expects to assign to this worker soon (for prefetching)."""

    index: int
    sha256: str


class SliceAssign(Msg, frozen=True, kw_only=True):
    dataset: str
    index: int
    epoch: int
    sha256: str
    providers: list[str]
    upcoming: list[SliceHint] = msgspec.field(default_factory=list)


class NoSlice(Msg, frozen=True, kw_only=True):
    reason: str


class SliceReturned(Msg, frozen=True, kw_only=True):
    """A worker gives back an assigned slice it could not fetch; it becomes AVAILABLE again.

    ``epoch`` is the assignment's (``SliceAssign.epoch``), so a late return cannot take back
    a later assignment of the same slice.
    """

    job_id: str
    dataset: str
    index: int
    epoch: int
    reason: str


# --- bulk tensors -------------------------------------------------------------------------


class TensorOffer(Msg, frozen=True, kw_only=True):
    """Bytes ready to be pulled: dial ``address`` (TLS) or open ``/hypha/tensor/1``.

    The receiver presents ``token`` on the bulk connection and gets exactly ``size`` bytes
    whose sha256 must equal ``sha256``.
    """

    transfer_id: str
    purpose: Purpose
    size: int
    sha256: str
    token: str
    address: str | None = None
    name: str = ""
    job_id: str = ""
    task_id: str = ""
    round: int = 0
    samples: int = 0
    encoding: Encoding = "fp32"


class TensorPushRequest(Msg, frozen=True, kw_only=True):
    """The sender asks the receiver to pull an offered transfer; answered once stored."""

    offer: TensorOffer


class TransferDone(Msg, frozen=True, kw_only=True):
    transfer_id: str
    ok: bool
    detail: str = ""


class StreamPullRequest(Msg, frozen=True, kw_only=True):
    """First frame on ``/hypha/tensor/1``: the token of the offer to stream."""

    transfer_id: str
    token: str


Message = (
    Ack
    | ErrorResponse
    | HealthRequest
    | HealthResponse
    | EchoRequest
    | EchoResponse
    | WorkerRequest
    | OfferRequest
    | OfferDecision
    | RenewLeaseRequest
    | LeaseRenewed
    | LeaseGone
    | ReleaseLeaseRequest
    | DispatchTask
    | Dispatched
    | Refused
    | TaskStatus
    | ProgressRequest
    | Continue
    | SyncAfter
    | Done
    | RoundClosed
    | ParameterServerReady
    | RoundPlan
    | JobMemberRequest
    | JobMemberResponse
    | WeightsRequest
    | JobFinished
    | DatasetRecord
    | ManifestRequest
    | ManifestResponse
    | SliceRequest
    | NextSliceRequest
    | SliceAssign
    | NoSlice
    | SliceReturned
    | TensorOffer
    | TensorPushRequest
    | TransferDone
    | StreamPullRequest
)
"""Every message the codec accepts at a stream boundary."""
