"""The executor's side of the job bridge: a synchronous HTTP client on the task's socket.

Owns ``Session`` (one ``httpx.Client`` over the Unix socket the worker named in
``HYPHA_SOCKET``) and ``BridgeError``. Everything the training script needs from the worker
goes through here: the job document, fetching and sending files, incoming files (SSE) and
progress. It never touches the network, trio or threads; bodies come from
``hypha.protocol.bridge``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Self, TypeVar

import httpx

from hypha.protocol import bridge as b
from hypha.protocol.codec import ProtocolError, decode_json, encode_json
from hypha.protocol.messages import Encoding

logger = logging.getLogger(__name__)

SOCKET_ENV: Final = "HYPHA_SOCKET"
WORK_DIR_ENV: Final = "HYPHA_WORK_DIR"
_BASE_URL: Final = "http://hypha"
_SILENT_WORKER_SECONDS: Final = 60.0
"""A receive stream silent this long past its idle time (keepalives are every few seconds)
means the worker is stuck; the iteration ends rather than hang."""
T = TypeVar("T")


class BridgeError(Exception):
    """The bridge refused a request, or could not be reached (``status`` 0).

    Attributes:
        status: the HTTP status, or 0 when no response came back.
        error: the machine-readable code from the ``ErrorBody``.
        detail: the human-readable explanation.
    """

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(f"bridge {status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail


class Session:
    """A connection to the worker that runs this executor.

    Args:
        socket_path: the bridge's Unix socket.
        work_dir: the task's work directory; bridge paths are relative to it.
        timeout_seconds: per-request limit; ``None`` (the default) waits as long as the
            worker needs, because fetches of large slices take a while.

    Resource handling: holds one pooled HTTP connection; call ``close()`` or use ``with``.
    """

    def __init__(
        self, socket_path: Path | str, work_dir: Path | str, *, timeout_seconds: float | None = None
    ) -> None:
        self.socket_path = Path(socket_path)
        self.work_dir = Path(work_dir)
        transport = httpx.HTTPTransport(uds=os.fspath(self.socket_path))
        self._client = httpx.Client(transport=transport, base_url=_BASE_URL, timeout=timeout_seconds)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        """Build a session from ``HYPHA_SOCKET`` and ``HYPHA_WORK_DIR``.

        Raises:
            RuntimeError: a variable is missing (the script was not started by a worker).
        """
        env = os.environ if environ is None else environ
        missing = [name for name in (SOCKET_ENV, WORK_DIR_ENV) if not env.get(name)]
        if missing:
            raise RuntimeError(
                f"{' and '.join(missing)} not set: this script must be started by a Hypha "
                "worker, or given Session(socket_path, work_dir) explicitly"
            )
        return cls(env[SOCKET_ENV], env[WORK_DIR_ENV])

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; the session cannot be used afterwards."""
        self._client.close()

    def local_path(self, rel: str) -> Path:
        """Return the absolute path of a bridge path (``FetchedFile.path`` and friends)."""
        return self.work_dir / rel

    # --- requests --------------------------------------------------------------------------

    def _request(self, method: str, url: str, body: object | None = None) -> httpx.Response:
        content = None if body is None else encode_json(body)
        headers = {} if body is None else {"content-type": "application/json"}
        try:
            response = self._client.request(method, url, content=content, headers=headers)
        except httpx.TransportError as exc:
            raise BridgeError(0, "unreachable", f"{method} {url}: {exc!r}") from exc
        if response.is_error:
            raise _error_of(response)
        return response

    def _decode(self, response: httpx.Response, kind: type[T]) -> T:
        try:
            return decode_json(response.content, kind)
        except ProtocolError as exc:
            raise BridgeError(response.status_code, "invalid_response", str(exc)) from exc

    def job(self) -> bytes:
        """Return the task's job document (JSON) exactly as the worker received it."""
        return self._request("GET", "/job").content

    def job_config(self, kind: type[T]) -> T:
        """Decode the job document as ``kind`` (a msgspec Struct or dataclass).

        Raises:
            hypha.protocol.codec.ProtocolError: the document does not match ``kind``.
        """
        return decode_json(self.job(), kind)

    def health(self) -> b.HealthBody:
        """Ask whether the worker's bridge is up."""
        return self._decode(self._request("GET", "/health"), b.HealthBody)

    def fetch(self, ref: b.Reference) -> list[b.FetchedFile]:
        """Ask the worker to place the resource ``ref`` in the work directory.

        Returns:
            The files, with paths relative to ``work_dir`` (see ``local_path``).

        Raises:
            BridgeError: the reference is invalid (400) or the worker could not get it (5xx).
        """
        response = self._request("POST", "/resources/fetch", b.FetchRequest(ref=ref))
        return self._decode(response, b.FetchResponse).files

    def send(
        self,
        path: Path | str,
        *,
        peers: Sequence[str] = (),
        target: b.SendTarget = "peers",
        purpose: b.SendPurpose = "file",
        round: int = 0,
        samples: int = 0,
        encoding: Encoding = "fp32",
    ) -> list[str]:
        """Push a work-directory file to other tasks and wait until they have it.

        Args:
            path: relative to ``work_dir``, or absolute inside it.
            peers: peer ids, when ``target`` is ``"peers"``.
            target: ``"peers"``, or a role the worker resolves: ``"parameter_server"`` or
                ``"trainers"``.
            purpose: what the file is to the receivers.
            round: the outer round the file belongs to.
            samples: the number of samples behind an update (for weighting).
            encoding: the tensor encoding of the file.

        Returns:
            The peer ids that acknowledged the file.

        Raises:
            ValueError: an absolute ``path`` outside ``work_dir``.
            BridgeError: the bridge refused the request or the transfer failed.
        """
        request = b.SendRequest(
            path=self._relative(Path(path)),
            peers=list(peers),
            target=target,
            purpose=purpose,
            round=round,
            samples=samples,
            encoding=encoding,
        )
        response = self._request("POST", "/resources/send", request)
        return self._decode(response, b.SendResponse).delivered

    def _relative(self, path: Path) -> str:
        if not path.is_absolute():
            return path.as_posix()
        try:
            return path.relative_to(self.work_dir).as_posix()
        except ValueError:
            raise ValueError(f"{path} is not inside the work dir {self.work_dir}") from None

    def report_progress(self, body: b.ProgressBody) -> b.InstructionBody:
        """Report progress and return the scheduler's instruction (continue, sync or done)."""
        return self._decode(self._request("POST", "/progress", body), b.InstructionBody)

    def report_metrics(self, round: int, values: Mapping[str, float]) -> None:
        """Record named scalar metrics of ``round``."""
        self._request("POST", "/metrics", b.MetricsBody(round=round, values=dict(values)))

    def receive(self, timeout: float | None = None) -> Iterator[b.ReceivedFile]:
        """Yield files other tasks push to this task, as they arrive.

        The subscription starts at the first ``next()``; files that arrived before are
        queued by the worker and come first.

        Args:
            timeout: end the iteration once no file has arrived for this many seconds (the
                worker ends the stream, so no file is lost in between). ``None`` waits until
                the worker ends the stream.

        Breaking out of the loop early can drop a file the worker had already written to
        the stream; keep one iteration open (as the trainer does) or pass ``timeout``.

        Raises:
            BridgeError: the stream could not be opened or carried a malformed event.
        """
        params = {} if timeout is None else {"idle": repr(float(timeout))}
        read = None if timeout is None else timeout + _SILENT_WORKER_SECONDS
        http_timeout = httpx.Timeout(self._client.timeout.connect, read=read)
        try:
            with self._client.stream(
                "GET", "/resources/receive", params=params, timeout=http_timeout
            ) as resp:
                if resp.is_error:
                    resp.read()
                    raise _error_of(resp)
                for event in _sse_events(resp.iter_lines()):
                    if event is not None:
                        yield self._decode_event(resp.status_code, event)
                logger.debug("the worker ended the receive stream")
        except httpx.ReadTimeout:
            logger.warning("the worker sent nothing on the receive stream for %.0f s", read)
        except httpx.TransportError as exc:
            raise BridgeError(0, "unreachable", f"receive stream: {exc!r}") from exc

    @staticmethod
    def _decode_event(status: int, data: str) -> b.ReceivedFile:
        try:
            return decode_json(data, b.ReceivedFile)
        except ProtocolError as exc:
            raise BridgeError(status, "invalid_response", str(exc)) from exc


def _sse_events(lines: Iterator[str]) -> Iterator[str | None]:
    """Turn server-sent-event lines into event data; ``None`` marks a keepalive or comment."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith(":"):
            yield None
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        # other fields (event:, id:, retry:) carry nothing the bridge uses


def _error_of(response: httpx.Response) -> BridgeError:
    try:
        body = decode_json(response.content, b.ErrorBody)
    except ProtocolError:
        return BridgeError(response.status_code, "http_error", response.text[:200])
    return BridgeError(response.status_code, body.error, body.detail)
