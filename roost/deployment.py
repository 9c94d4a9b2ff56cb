"""``roost serve`` and ``roost node``: a run deployed on real nodes over gRPC.

The server is the run of :func:`roost.runner.run` (the same engine, metrics, run
directory, checkpoints and progress display) with ``remote``: the engine runs on a
:class:`~roost.clock.WallClock` and its tasks go to the nodes connected to a
:class:`~roost.deploy.server.DeployServer` through an
:class:`~roost.deploy.coordinator.EngineCoordinator`. A record's ``virtual_time_s`` is
then wall seconds since the run started.

A node registers, receives the run's resolved config, builds the algorithm and model from
it and its own data (by default its client of the run's partitioned set; with
``data=...`` overrides any loader and partition, of which it holds one client), keeps its
client state on its own disk (``state_dir``), and trains every task it is given with the
algorithm's own update (:class:`~roost.deploy.node.NodeWorker`) until the server says the
run is over.

This module is the assembly layer of deployment (it imports the build and config layers
and the transport); needs the ``deploy`` extra, imported when a server or node starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from roost.build import RunParts, build_parts
from roost.clock import WallClock
from roost.config import ResolvedConfig, apply_overrides, resolve
from roost.engine import History
from roost.engine.remote import RemoteFleet
from roost.errors import RoostWarning
from roost.registry import ConfigError
from roost.runner import RemoteFactory

if TYPE_CHECKING:
    from roost.deploy.client import ClientConfig, NodeClient
    from roost.deploy.node import NodeWorker

__all__ = [
    "NODE_KEYS",
    "NodeOptions",
    "ServeOptions",
    "run_node",
    "serve",
]

log = logging.getLogger("roost.deploy")

NODE_KEYS = ("data", "partition", "clients", "threads")
"""What a node may set on top of the run's config: its own data (loader and partition,
and how many clients that partition has) and its torch threads."""


@dataclass(frozen=True)
class ServeOptions:
    """How ``roost serve`` listens and whom it trusts.

    ``keys``: a ``roost keys`` directory (``allowlist.txt``, ``server.pem``,
    ``server.key``, ``ca.pem``); ``allow_list``: another allow-list file instead of
    ``keys/allowlist.txt``. TLS with ``server.pem`` unless ``plaintext`` (refused on an
    address that is not loopback); ``mutual_tls``: nodes must present a certificate signed
    by ``ca.pem``. ``task_timeout_s``: a task with no result that long after dispatch is
    lost; ``heartbeat_s``: how often a busy node heartbeats; ``silent_after_s``: a node
    silent that long is disconnected and its tasks are lost (default: 3 heartbeats);
    ``retry_after_s``: how soon an idle node asks again for work; ``finish_grace_s``: how
    long the server waits after the run for every connected node to hear that it is over;
    ``min_nodes``: the run starts (and a resumed run goes on after replaying its journal)
    only once that many nodes are connected (the run's own policies wait for as many as
    their first round or their concurrency needs).
    """

    address: str
    keys: Path | None = None
    allow_list: Path | None = None
    plaintext: bool = False
    mutual_tls: bool = False
    task_timeout_s: float = 600.0
    heartbeat_s: float = 10.0
    silent_after_s: float | None = None
    retry_after_s: float = 1.0
    finish_grace_s: float = 10.0
    min_nodes: int = 0


def _serve_remote(
    options: ServeOptions, out: Path, on_ready: Callable[[str], None] | None
) -> RemoteFactory:
    """The :data:`~roost.runner.RemoteFactory` of ``roost serve``: the journal in ``out``."""
    from roost.deploy.auth import AllowList, Verifier
    from roost.deploy.coordinator import EngineCoordinator
    from roost.deploy.journal import JOURNAL_FILE, Journal
    from roost.deploy.server import DeployServer, ServerConfig
    from roost.deploy.tls import ServerTls, is_loopback

    if options.plaintext and not is_loopback(options.address):
        raise ValueError(
            f"--plaintext serves without TLS, allowed only on a loopback address "
            f"(127.0.0.1, ::1, localhost), not {options.address}: drop it to serve with TLS "
            "from --keys DIR"
        )
    if options.allow_list is None and options.keys is None:
        raise ValueError(
            "roost serve needs the nodes' public keys: --keys DIR (made by roost keys) or "
            "--allow-list FILE"
        )
    allow_path = options.allow_list or Path(options.keys or ".") / "allowlist.txt"
    allowed = AllowList.load(allow_path)
    tls = None
    if not options.plaintext:
        if options.keys is None:
            raise ValueError(
                "TLS needs the server's certificate: --keys DIR (server.pem, server.key), "
                "or --plaintext on a loopback address"
            )
        tls = ServerTls.from_dir(options.keys, mutual=options.mutual_tls)
        for path in (tls.cert, tls.key, *([tls.client_ca] if tls.client_ca else [])):
            if not path.exists():
                raise FileNotFoundError(f"{path}: no such file (roost keys DIR makes it)")
    silent_after = options.silent_after_s or 3 * options.heartbeat_s
    server_config = ServerConfig(
        heartbeat_interval_s=options.heartbeat_s, retry_after_s=options.retry_after_s
    )

    @contextlib.contextmanager
    def fleet(
        clock: WallClock,
        num_clients: int,
        cfg: ResolvedConfig,
        resumed_step: int | None,
        parts: RunParts,
    ) -> Iterator[RemoteFleet]:
        journal = Journal(out / JOURNAL_FILE)
        algorithm = parts.algorithm
        split = None
        if algorithm.splits_the_model:  # the server part's replicas run here
            split = algorithm.split_serving(parts.build_module, parts.dataset.info)
            if resumed_step is not None and split is not None and split.keeps_momentum:
                warnings.warn(
                    f"{cfg.name('algorithm')} keeps each client's SGD momentum of the server "
                    "part in the server's memory, which a restart lost: it starts again "
                    "from zero, so this resumed run is not the uninterrupted one",
                    RoostWarning,
                    stacklevel=2,
                )
        coordinator = EngineCoordinator(
            clock,
            num_clients,
            task_timeout_s=options.task_timeout_s,
            silent_after_s=silent_after,
            run_config=json.dumps(cfg.to_dict()),
            journal=journal,
            replay_step=resumed_step,
            min_nodes=options.min_nodes,
            decode_upload=algorithm.decode_upload,
            split=split,
        )
        server = DeployServer(
            coordinator, Verifier(allowed), address=options.address, tls=tls, config=server_config
        )
        server.start()
        coordinator.start_watchdog()
        try:
            if on_ready is not None:
                on_ready(server.address)
            if resumed_step is None:  # resumed: once the journal is replayed
                coordinator.wait_for_nodes()
            yield coordinator
        finally:
            coordinator.finish()
            deadline = time.monotonic() + options.finish_grace_s
            while not coordinator.all_told_finished() and time.monotonic() < deadline:
                time.sleep(0.05)
            server.stop(1.0)
            coordinator.close()
            journal.close()

    return fleet


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_blocks_to_os() -> bool:
    """Make glibc's malloc serve every block of 1 MiB or more with its own mmap, so that a
    freed model-size buffer goes back to the OS at once; True if it took effect.

    By default glibc raises its mmap threshold when such a block is freed and then keeps
    later ones in its per-thread arenas; with a server's 64 gRPC threads, each receiving and
    decoding models, that memory grows with the number of nodes up to the arenas' count.
    benchmarks/deploy.py measured, for the cnn and 100 nodes, the server's growth over a
    round at 1,279 MB with glibc's default and 335 MB with this setting (docs/benchmarks.md,
    there set by ``MALLOC_MMAP_THRESHOLD_``, which is the same). ``roost serve`` calls it (it
    is the whole process's setting: :func:`serve` leaves an embedding program's allocator
    alone). Elsewhere than glibc (or when it cannot be loaded) nothing changes."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def serve(
    cfg: ResolvedConfig | None,
    out: str | Path,
    options: ServeOptions,
    *,
    resume: bool = False,
    progress: bool = False,
    on_ready: Callable[[str], None] | None = None,
) -> History:
    """Serve the run ``cfg`` (or, ``resume``, the run kept in ``out``) to nodes, keeping
    its run directory in ``out``; ``on_ready`` is called with the bound ``HOST:PORT``."""
    from roost.runner import resume as resume_run
    from roost.runner import run

    remote = _serve_remote(options, Path(out), on_ready)
    if resume:
        return resume_run(out, progress=progress, remote=remote)
    assert cfg is not None
    return run(cfg, out, progress=progress, remote=remote)


@dataclass(frozen=True)
class NodeOptions:
    """How ``roost node`` connects and what it holds.

    ``key``: the node's directory of a ``roost keys`` federation (``node.key``,
    ``node.pub``; ``client.pem``/``client.key`` for mutual TLS); ``ca``: the CA that signed
    the server's certificate (default: ``ca.pem`` two levels above ``key``, where
    ``roost keys`` puts it); ``plaintext``: no TLS (loopback only). ``client_id``: which
    client of the data the node holds; without data overrides that is the run's own
    partitioned set and the id is declared to the server (absent: the server assigns
    one and the node holds that client); with ``overrides`` (keys under
    :data:`NODE_KEYS`) the node builds its own data, holds its client ``client_id``
    (default 0) and takes whatever id the server assigns. ``state_dir``: where the node
    keeps its client state (on disk, reopened when the node restarts); None keeps it in
    memory.
    """

    server: str
    key: Path
    ca: Path | None = None
    plaintext: bool = False
    mutual_tls: bool = False
    client_id: int | None = None
    overrides: tuple[str, ...] = ()
    state_dir: Path | None = None
    max_tasks: int | None = None
    client_config: ClientConfig | None = None
    """Timeouts and the backoff of reconnection (default: :class:`ClientConfig`'s)."""


NODE_STATE_FILE = "node_state.json"


def _check_node_overrides(overrides: Sequence[str]) -> None:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(item, "", "a node override is KEY=VALUE")
        if key.strip().partition(".")[0] not in NODE_KEYS:
            raise ConfigError(
                key.strip(),
                value,
                f"a node may set only its own data: {', '.join(NODE_KEYS)} (and their "
                "FIELDs); the rest of the run's config comes from the server",
            )


def run_node(options: NodeOptions, stop: threading.Event | None = None) -> int:
    """Connect, register, train tasks until the run is over (or ``stop`` is set);
    returns how many tasks this node trained."""
    from roost.deploy.auth import NodeKey
    from roost.deploy.client import NodeClient
    from roost.deploy.tls import ClientTls, is_loopback

    _check_node_overrides(options.overrides)
    if options.plaintext and not is_loopback(options.server):
        raise ValueError(
            f"--plaintext connects without TLS, allowed only to a loopback address, not "
            f"{options.server}: drop it and give the server's CA with --ca"
        )
    key = NodeKey.load(options.key)
    tls = None
    if not options.plaintext:
        ca = options.ca or options.key.parent.parent / "ca.pem"
        if not ca.exists():
            raise FileNotFoundError(f"{ca}: no CA certificate to check the server with (--ca)")
        if options.mutual_tls:
            tls = ClientTls(ca, options.key / "client.pem", options.key / "client.key")
        else:
            tls = ClientTls(ca)
    declared = options.client_id if not options.overrides else None
    properties: dict[str, Any] = {"ready": False}  # the config first; work once built
    if declared is not None:
        properties["client_id"] = declared
    client = NodeClient(
        options.server, key, tls=tls, properties=properties, config=options.client_config
    )
    try:
        info = client.register()
        if not info.run_config:
            raise RuntimeError(f"server {options.server} sent no run config at registration")
        tree = apply_overrides(json.loads(info.run_config), list(options.overrides))
        tree["clients_per_round"] = 1  # a node selects no one: its data may have 1 client
        cfg = resolve(tree)
        data_client = info.client_id if not options.overrides else (options.client_id or 0)
        worker, num_examples = _node_worker(
            client, cfg, info.client_id, data_client, options.state_dir
        )
        client.num_examples = num_examples
        # it keeps this client id when it registers again (after a restart of the server)
        client.properties = {"client_id": info.client_id}
        client.register()  # again, ready, with the size of its data
        log.info("node %s holds client %d of the run", key.node_id, info.client_id)
        return worker.run(stop or threading.Event(), options.max_tasks)
    finally:
        client.close()


def _node_worker(
    client: NodeClient,
    cfg: ResolvedConfig,
    client_id: int,
    data_client: int,
    state_dir: Path | None,
) -> tuple[NodeWorker, int]:
    """The node's worker for ``cfg`` holding client ``data_client`` of its data, and how
    many examples that client has."""
    import torch

    from roost.deploy.node import NodeWorker
    from roost.params import ParamLayout
    from roost.runtime.base import Job
    from roost.runtime.capture import CapturingAlgorithm
    from roost.runtime.local import LocalRuntime, LocalRuntimeConfig
    from roost.runtime.threads import default_threads
    from roost.state import make_state_store
    from roost.track.files import atomic_write_bytes

    parts = build_parts(cfg)
    dataset = parts.dataset
    # the run's torch thread count, as the simulation's: the bits of a matrix product
    # depend on how many threads sum it, so a task must be computed with the same count
    threads = cfg.run.threads
    if threads is None:
        threads = default_threads(parts.build_module(), dataset.info)
    if threads is not None:
        torch.set_num_threads(threads)
    if not 0 <= data_client < dataset.num_clients:
        raise ConfigError(
            "--client-id",
            data_client,
            f"the node's data has clients 0 .. {dataset.num_clients - 1}",
        )
    spec = parts.algorithm.client_state_spec(ParamLayout.of(parts.build_module()).numel)
    checkpoint = None
    state_file = None
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
        state_file = state_dir / NODE_STATE_FILE
        if state_file.exists():
            checkpoint = json.loads(state_file.read_text())
    store = make_state_store(
        "disk" if state_dir is not None else "memory",
        spec,
        dataset.num_clients,
        state_dir,
        checkpoint=checkpoint,
    )

    def record() -> None:
        if state_file is not None:
            atomic_write_bytes(state_file, json.dumps(store.checkpoint_state()).encode())

    capture = CapturingAlgorithm(parts.algorithm)
    runtime = LocalRuntime(LocalRuntimeConfig())
    runtime.start(Job(capture, dataset, parts.build_module, store))  # type: ignore[arg-type]
    split = None
    if parts.algorithm.splits_the_model:  # the node trains the device part alone
        split = parts.algorithm.split_serving(parts.build_module, dataset.info)
    worker = NodeWorker(
        client,
        runtime,
        capture,
        client_id,
        data_client,
        split=split,
        store=store,
        first_step=int(checkpoint["round"]) if checkpoint else 0,
        on_commit=record if state_file is not None else None,
        test_data=dataset.client_test_data(data_client),
    )
    return worker, dataset.num_examples(data_client)


def print_ready(address: str) -> None:
    print(f"roost: serving on {address}", file=sys.stderr, flush=True)
