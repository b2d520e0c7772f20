"""``hypha``: the command line. Thin: parse, load config, set up logging, ``trio.run``.

Owns the commands and their flags: the four role commands (gateway, worker, scheduler,
data), each a few lines over ``runner.run_role``, and ``data prepare``, ``up``, ``job
validate``, ``init``, ``probe`` and ``certutil``; and ``main(argv)``, which turns typer's
exits into an exit code. Loading configs, logging, signals and error lines (2 for bad
configuration or input, 1 for runtime failures) are ``runner.py``'s; the work is delegated.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import trio
import typer

from hypha.cli.runner import err, fail, net_overrides, run_role, run_until_signal, where
from hypha.config import render_default
from hypha.config.job import JobSpec, load_job
from hypha.config.schema import DataConfig, GatewayConfig, SchedulerConfig, WorkerConfig
from hypha.errors import ConfigError, HyphaError
from hypha.local.logs import init_logging

app = typer.Typer(
    help="Hypha: decentralized DiLoCo training on machines you do not control centrally.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
certutil = typer.Typer(help="Development PKI: a CA, node certificates, revocation.", no_args_is_help=True)
app.add_typer(certutil, name="certutil")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file.")]
ValidateOpt = Annotated[
    bool,
    typer.Option("--validate", help="Check the config and exit: 0 if valid, 2 with every problem."),
]
ReadyOpt = Annotated[
    Path | None,
    typer.Option("--ready-file", help="Write {role, peer_id, listen_addresses} JSON here once up."),
]
ListenOpt = Annotated[list[str] | None, typer.Option("--listen", help="Listen multiaddr (repeatable).")]
GatewayOpt = Annotated[list[str] | None, typer.Option("--gateway", help="Gateway multiaddr (repeatable).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs, libp2p's included.")]


@app.command()
def gateway(
    config: ConfigOpt = None,
    validate: ValidateOpt = False,
    ready_file: ReadyOpt = None,
    listen: ListenOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run a gateway: bootstrap peer, DHT anchor, circuit relay."""
    from hypha.gateway import run_gateway

    async def serve(cfg: GatewayConfig) -> None:
        await run_gateway(cfg, ready_file=ready_file)

    overrides = net_overrides(listen)
    run_role("gateway", GatewayConfig, config, serve, validate=validate, verbose=verbose, overrides=overrides)


@app.command()
def worker(
    config: ConfigOpt = None,
    validate: ValidateOpt = False,
    ready_file: ReadyOpt = None,
    listen: ListenOpt = None,
    gateway: GatewayOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run a worker: offer resources at a price, hold leases, run executors."""
    from hypha.worker import run_worker

    async def serve(cfg: WorkerConfig) -> None:
        await run_worker(cfg, ready_file=ready_file)

    overrides = net_overrides(listen, gateway)
    run_role("worker", WorkerConfig, config, serve, validate=validate, verbose=verbose, overrides=overrides)


def _load_job(path: Path) -> tuple[JobSpec, int]:
    """Load and check a job spec, its model included; return it and the model's size."""
    from hypha.scheduler.documents import check_job

    try:
        spec = load_job(path)
        return spec, check_job(spec, str(path))
    except ConfigError as exc:
        fail(str(exc), exc.problems)


@app.command()
def scheduler(
    job: Annotated[Path, typer.Option("--job", "-j", help="Job spec (TOML).")],
    config: ConfigOpt = None,
    validate: ValidateOpt = False,
    ready_file: ReadyOpt = None,
    listen: ListenOpt = None,
    gateway: GatewayOpt = None,
    allocate_only: Annotated[
        bool,
        typer.Option("--allocate-only", help="Only lease the trainer pool and hold it (smoke test)."),
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Go on with this job's saved state (state_dir) if it is unfinished, from its last round.",
        ),
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run a scheduler for one job: lease workers, dispatch, synchronise."""
    from hypha.scheduler.node import run_scheduler

    spec, _ = _load_job(job)

    async def serve(cfg: SchedulerConfig) -> None:
        await run_scheduler(
            cfg, spec, ready_file=ready_file, allocate_only=allocate_only, model_checked=True, resume=resume
        )

    overrides = net_overrides(listen, gateway)
    run_role(
        "scheduler", SchedulerConfig, config, serve, validate=validate, verbose=verbose, overrides=overrides
    )


data_app = typer.Typer(
    help="Run a data node (hypha data -c data.toml), or prepare a dataset (hypha data prepare).",
    invoke_without_command=True,
)
app.add_typer(data_app, name="data")


@data_app.callback()
def data(
    ctx: typer.Context,
    config: ConfigOpt = None,
    validate: ValidateOpt = False,
    ready_file: ReadyOpt = None,
    listen: ListenOpt = None,
    gateway: GatewayOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run a data node: announce datasets in the DHT and serve their slices."""
    if ctx.invoked_subcommand is not None:
        return
    from hypha.datanode.node import load_datasets, run_data_node

    def check(cfg: DataConfig) -> str:
        try:
            datasets = load_datasets(list(cfg.dataset_path))
        except HyphaError as exc:
            fail(f"{where(config)}: dataset_path: {exc}")
        if not datasets:
            fail(f"{where(config)}: dataset_path: no dataset to serve")
        return ", ".join(sorted(datasets))

    async def serve(cfg: DataConfig) -> None:
        await run_data_node(cfg, ready_file=ready_file)

    overrides = net_overrides(listen, gateway)
    run_role(
        "data",
        DataConfig,
        config,
        serve,
        validate=validate,
        verbose=verbose,
        overrides=overrides,
        check=check,
    )


@data_app.command("prepare")
def data_prepare(
    source: Annotated[
        Path, typer.Argument(help="Folder of text files, a .npy/.npz array file, or a .csv file.")
    ],
    name: Annotated[str, typer.Option("--name", help="Dataset name (announced in the DHT).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory for manifest.json and slices.")],
    slice_samples: Annotated[int, typer.Option("--slice-samples", help="Samples per slice.")] = 256,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sequence (text).")] = 64,
    tokenizer: Annotated[str, typer.Option("--tokenizer", help="Text tokenizer: byte.")] = "byte",
    max_samples: Annotated[
        int | None, typer.Option("--max-samples", help="Stop after this many samples.")
    ] = None,
) -> None:
    """Prepare a dataset into SafeTensors slices and a manifest (deterministic)."""
    from rich.progress import Progress

    from hypha.data.prepare import prepare_dataset

    try:
        with Progress(console=err, transient=True) as bar:
            task = bar.add_task(f"preparing {name}", total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            manifest = prepare_dataset(
                source,
                name,
                out,
                slice_samples=slice_samples,
                seq_len=seq_len,
                tokenizer=tokenizer,
                max_samples=max_samples,
                progress=progress,
            )
    except (HyphaError, ValueError) as exc:
        fail(str(exc))
    err.print(f"{name}: {manifest.num_samples} samples in {manifest.num_slices} slices written to {out}")


@app.command()
def up(
    workers: Annotated[
        int, typer.Option("--workers", "-n", help="Trainer workers (plus one parameter server).")
    ] = 3,
    job: Annotated[
        Path | None, typer.Option("--job", "-j", help="Job spec; default: the built-in demo.")
    ] = None,
    rounds: Annotated[
        int | None, typer.Option("--rounds", help="Override the demo's number of rounds.")
    ] = None,
    single_process: Annotated[
        bool,
        typer.Option("--single-process", help="All roles in this process (trainers still run as children)."),
    ] = False,
    directory: Annotated[
        Path, typer.Option("--dir", help="Where the network's files and datasets go.")
    ] = Path("runs/local"),
    live: Annotated[bool, typer.Option("--live/--no-live", help="Draw the live view.")] = True,
    verbose: VerboseOpt = False,
) -> None:
    """Start a whole Hypha network on this machine and train one job with DiLoCo."""
    from hypha.cli.up import run_up
    from hypha.local import make_plan
    from hypha.scheduler.documents import check_job

    if workers < 1:
        fail("--workers must be at least 1")
    if single_process:  # py-libp2p resets its loggers when first imported: import it before ours
        import hypha.net.host  # noqa: F401
    init_logging("up", verbose=verbose, quiet=not verbose)
    try:
        plan = make_plan(directory, job, workers, rounds)
        check_job(plan.job, str(plan.job_path))
        code = run_up(plan, err, single_process=single_process, live=live)
    except ConfigError as exc:
        fail(str(exc), exc.problems)
    except HyphaError as exc:
        fail(str(exc), code=1)
    raise typer.Exit(code)


job_app = typer.Typer(help="Job specs.", no_args_is_help=True)
app.add_typer(job_app, name="job")


@job_app.command("validate")
def job_validate(path: Annotated[Path, typer.Argument(help="Job spec (TOML).")]) -> None:
    """Check a job spec: exit 0 if valid, 2 with every problem."""
    spec, num_parameters = _load_job(path)
    size = f", a {num_parameters:_}-parameter model" if num_parameters else ""
    trainers = f"{spec.trainers.target} trainers"
    err.print(f"{path}: job {spec.name!r} is valid ({spec.rounds} rounds, {trainers}{size})")


@app.command()
def init(
    role: Annotated[str, typer.Argument(help="gateway, scheduler, worker or data")],
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write.")] = Path("config.toml"),
    name: Annotated[
        str | None, typer.Option("--name", "-n", help="Node name for the cert/key file names.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented default config for ROLE."""
    from hypha.config.schema import ROLE_CONFIGS

    if role not in ROLE_CONFIGS:
        fail(f"unknown role {role!r}; expected one of {', '.join(ROLE_CONFIGS)}")
    if output.exists() and not force:
        fail(f"{output} exists; pass --force to overwrite it")
    output.write_text(render_default(role, name))
    err.print(f"wrote {output}")


@app.command()
def probe(
    address: Annotated[str, typer.Argument(help="Multiaddr of the node, ending in /p2p/<peer id>.")],
    config: ConfigOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 2.0,
    verbose: VerboseOpt = False,
) -> None:
    """Exit 0 if the node at ADDRESS answers healthy within --timeout, 1 otherwise."""
    from hypha.config.load import load_identity
    from hypha.net.probe import probe_health

    try:
        cfg = load_identity(config)
    except ConfigError as exc:
        fail(str(exc), exc.problems)
    init_logging("probe", verbose=verbose, quiet=True)
    result: dict[str, Any] = {}

    async def main() -> None:
        with trio.move_on_after(timeout):
            result["response"] = await probe_health(cfg, address)

    run_until_signal("probe", main)
    response = result.get("response")
    if response is None or not response.healthy:
        err.print(f"{address}: unhealthy or no answer within {timeout}s")
        raise typer.Exit(1)
    typer.echo(f"{address}: healthy ({response.role} {response.peer_id})")


@certutil.command("ca")
def certutil_ca(
    org: Annotated[str, typer.Option("--org", help="Organisation name of the CA.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for ca-cert.pem, ca-key.pem, crl.pem.")],
    days: Annotated[int, typer.Option(help="Validity in days.")] = 3650,
) -> None:
    """Create a development CA."""
    from hypha.pki import create_ca

    try:
        create_ca(org, out, days=days)
    except HyphaError as exc:
        fail(str(exc))
    err.print(f"CA written to {out} (ca-cert.pem, ca-key.pem [0600], crl.pem)")


@certutil.command("node")
def certutil_node(
    ca: Annotated[Path, typer.Option("--ca", help="CA directory.")],
    name: Annotated[str, typer.Option("--name", help="Node name.")],
    role: Annotated[str, typer.Option("--role", help="gateway, scheduler, worker or data.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory.")],
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
) -> None:
    """Issue a node key and certificate bound to its peer ID."""
    from hypha.pki import issue_node, peer_id_of
    from hypha.pki.ca import load_private_key

    try:
        files = issue_node(ca, name, role, out, days=days)
    except HyphaError as exc:
        fail(str(exc))
    peer = peer_id_of(load_private_key(files.key).public_key())
    err.print(f"{name} ({role}) peer ID {peer}: {files.cert}, {files.key} [0600], {files.trust}")


@certutil.command("revoke")
def certutil_revoke(
    ca: Annotated[Path, typer.Option("--ca", help="CA directory.")],
    cert: Annotated[Path, typer.Option("--cert", help="Certificate to revoke.")],
) -> None:
    """Add a certificate to the CA's crl.pem."""
    from hypha.pki import revoke

    try:
        serial = revoke(ca, cert)
    except HyphaError as exc:
        fail(str(exc))
    err.print(f"revoked serial {serial:x}; distribute {ca / 'crl.pem'} to every node (crls_pem)")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (tests call this in-process)."""
    try:
        rc = app(args=argv, prog_name="hypha", standalone_mode=False)
        if isinstance(rc, int):
            return rc
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:
        return 130
    except typer.TyperException as exc:
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            err.print(f"error: {exc}", markup=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
