"""The parameter server's torch side: global weights, the outer step and evaluation.

Owns one job's model, its fp32 parameters, the Nesterov outer optimizer, the error-feedback
residual of the encoded broadcast, and the held-out batches. Every method blocks (torch, file
I/O): ``executors/aggregate.py`` calls them only from a worker thread under ``TORCH``. Torch
and the training modules are imported lazily, so importing the worker does not load torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from hypha.protocol import messages as m
from hypha.protocol.tasks import AggregateTask

if TYPE_CHECKING:
    import torch

TORCH = trio.CapacityLimiter(1)
"""At most one torch computation of the worker's parameter servers at a time."""


@dataclass
class Update:
    """One trainer's pseudo-gradient of a round, received into ``path``."""

    sender: str
    samples: int
    path: Path


class OuterMaths:
    """The torch side, only ever called from a worker thread under ``TORCH``."""

    def __init__(self, doc: AggregateTask, work_dir: Path) -> None:
        from hypha.training.models import build_task_model
        from hypha.training.outer import NesterovOuter

        self.model = build_task_model(doc.model, doc.seed, work_dir)
        self.params: dict[str, torch.Tensor] = {
            n: p.detach().clone().float() for n, p in self.model.named_parameters()
        }
        self.outer = NesterovOuter(lr=doc.outer.lr, momentum=doc.outer.momentum)
        self.weights_encoding: m.Encoding = "fp32"  # full weights (for newcomers) are exact
        self.delta_encoding: m.Encoding = doc.encoding  # what each round's broadcast costs
        self.delta: dict[str, torch.Tensor] = {}
        self.residual: dict[str, torch.Tensor] = {}
        self.eval_batches: list[dict[str, torch.Tensor]] = []
        numel = sum(p.numel() for p in self.params.values())
        self.max_update_bytes = 4 * numel + 256 * len(self.params) + (1 << 20)
        """Most bytes an encoded update of this model takes (fp32 data, header and metadata)."""

    def check_update(self, path: Path) -> str:
        """Why the update in ``path`` cannot be aggregated, or "" when it can.

        It must decode, name exactly the model's parameters with their shapes, and hold only
        finite floating-point values: anything else would poison or crash the outer step.
        """
        import torch

        from hypha.training.compress import load_tensors_file

        try:
            tensors, _ = load_tensors_file(path)
        except (ValueError, OSError, RuntimeError) as exc:
            return f"not a readable tensor file: {exc}"
        if set(tensors) != set(self.params):
            missing, extra = sorted(set(self.params) - set(tensors)), sorted(set(tensors) - set(self.params))
            return f"parameters differ from the model's (missing {missing[:3]}, unknown {extra[:3]})"
        for name, tensor in tensors.items():
            shape, wanted = tuple(tensor.shape), tuple(self.params[name].shape)
            if shape != wanted:
                return f"{name} has shape {shape}, the model's is {wanted}"
            if not tensor.is_floating_point():
                return f"{name} is not floating point"
            if not bool(torch.isfinite(tensor).all()):
                return f"{name} holds non-finite values"
        return ""

    def write_weights(self, path: Path, round_: int, encoding: m.Encoding | None = None) -> None:
        from hypha.training.compress import save_tensors_file

        save_tensors_file(path, self.params, encoding or self.weights_encoding, {"round": str(round_)})

    def write_delta(self, path: Path, round_: int) -> None:
        """The round's applied change (already representable exactly in ``delta_encoding``)."""
        from hypha.training.compress import save_tensors_file

        save_tensors_file(path, self.delta, self.delta_encoding, {"round": str(round_), "kind": "delta"})

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Copies of everything a checkpoint holds: weights, outer optimizer state, residual.

        The copies are what the round waits for; encoding and writing them happen later, in
        the background (``checkpoint_bytes``), while rounds go on.
        """
        state = {f"param.{n}": p.clone() for n, p in self.params.items()}
        state.update({f"outer.{k}": t for k, t in self.outer.state_dict().items()})  # already copies
        state.update({f"residual.{n}": r.clone() for n, r in self.residual.items()})
        return state

    @staticmethod
    def checkpoint_bytes(snapshot: dict[str, torch.Tensor], round_: int, job_id: str) -> bytes:
        """A snapshot as checkpoint data (safetensors, fp32: a checkpoint is exact)."""
        from hypha.training.compress import encode_tensors

        return encode_tensors(snapshot, "fp32", {"round": str(round_), "job_id": job_id})

    def restore(self, data: bytes) -> int:
        """Load a checkpoint written by ``checkpoint_bytes``; return the round it resumes at.

        Raises:
            ValueError: The data is not a checkpoint of this model.
        """
        from hypha.training.compress import decode_tensors

        tensors, meta = decode_tensors(data)
        params = {k.removeprefix("param."): t for k, t in tensors.items() if k.startswith("param.")}
        outer = {k.removeprefix("outer."): t for k, t in tensors.items() if k.startswith("outer.")}
        residual = {k.removeprefix("residual."): t for k, t in tensors.items() if k.startswith("residual.")}
        if set(params) != set(self.params) or any(
            params[n].shape != self.params[n].shape for n in self.params
        ):
            raise ValueError("the checkpoint's parameters are not this model's")
        if residual and set(residual) != set(self.params):
            raise ValueError("the checkpoint's residual does not match the model's parameters")
        self.outer.load_state_dict(outer)
        self.params = {n: t.float().clone() for n, t in params.items()}
        self.residual = {n: t.float().clone() for n, t in residual.items()}
        self.delta = {}
        return int(meta["round"])

    def step(self, updates: Sequence[Update]) -> None:
        """Outer step; the change is broadcast encoded, with error feedback kept here.

        Trainers add the decoded change to the weights they hold, and so does this server:
        every copy stays bit-identical, and what the encoding rounds away is carried into the
        next round's change instead of being lost.
        """
        from hypha.training.compress import decode_tensors, encode_tensors, load_tensors_file
        from hypha.training.outer import weighted_mean

        tensors = [load_tensors_file(u.path)[0] for u in updates]
        mean = weighted_mean(tensors, [float(u.samples) for u in updates])  # name -> tensor, float32
        old = {n: p.clone() for n, p in self.params.items()}  # theta_r, {name: [*shape]}
        self.outer.step(self.params, mean)  # params: theta_r+1 in full precision
        wanted = {n: self.params[n] - old[n] + self.residual.get(n, 0.0) for n in old}  # {name: [*shape]}
        decoded, _ = decode_tensors(encode_tensors(wanted, self.delta_encoding))  # what trainers get
        self.residual = {n: wanted[n] - decoded[n] for n in old}
        self.delta = {n: decoded[n] for n in old}
        self.params = {n: old[n] + decoded[n] for n in old}  # the same fp32 add every trainer does

    def load_eval(self, path: Path, batch_size: int, num_batches: int) -> None:
        from safetensors.torch import load_file

        from hypha.training.diloco import iter_batches

        tensors = load_file(str(path))
        self.eval_batches = list(iter_batches(tensors, batch_size, seed=0))[:num_batches]

    def evaluate(self) -> float | None:
        if not self.eval_batches:
            return None
        from hypha.training.diloco import evaluate, load_params

        load_params(self.model, self.params)
        return float(evaluate(self.model, self.eval_batches))
