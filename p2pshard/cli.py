"""The ``p2pshard`` command: run a peer, publish, load and inspect a swarm.

Every command takes ``--json`` (one JSON object on stdout) and otherwise prints
for people, with a progress bar on stderr for long transfers. Failures print
one line ``p2pshard: error: ...`` on stderr and exit non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

from tqdm import tqdm

from . import __version__
from .client import Client
from .dht import parse_address
from .errors import P2PShardError
from .formats.checkpoint import scan_path
from .hashing import check_name
from .peer import Peer
from .settings import MIB, Settings
from .store import DEFAULT_MAX_SHARD

__all__ = ["main"]

log = logging.getLogger(__name__)

EXIT_ERROR = 1
EXIT_USAGE = 2


def _address(text: str) -> str:
    try:
        parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0-65535, got {text!r}")
    return int(text)


def _shard_mib(text: str) -> int:
    limit = DEFAULT_MAX_SHARD // MIB
    value = _positive(text)
    if value > limit:
        raise argparse.ArgumentTypeError(f"shard size must be 1-{limit} MiB")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pshard", description="Store model weights across a swarm of peers."
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="print one JSON object")
        return p

    def swarm(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument(
            "--bootstrap",
            action="append",
            type=_address,
            required=required,
            default=[],
            metavar="HOST:PORT",
            help="a peer of the swarm (repeatable)",
        )
        p.add_argument(
            "--replicas", type=_positive, default=3, help="copies of each shard (k)"
        )

    p = command("peer", "run a peer until SIGINT or SIGTERM")
    p.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=0, help="UDP+TCP port (0: any free)")
    p.add_argument("--data", required=True, metavar="DIR", help="data directory")
    p.add_argument(
        "--capacity", type=_positive, metavar="BYTES", help="most bytes held"
    )
    p.add_argument(
        "--repair-interval",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="seconds between repair passes (default 60, jittered)",
    )
    p.add_argument(
        "--liveness-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="seconds between pings of the nearest peers (default 5; 0: off)",
    )
    p.add_argument(
        "--scrub-rate",
        type=float,
        default=0.0,
        metavar="BYTES_PER_S",
        help="re-hash held shards at this rate (default 0: off)",
    )
    p.add_argument(
        "--handoff-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="time to hand shards over on SIGTERM (default 30)",
    )
    swarm(p, required=False)

    p = command("publish", "publish a safetensors file or a model directory")
    p.add_argument("path")
    p.add_argument("--name", required=True)
    p.add_argument(
        "--async",
        dest="asynchronous",
        action="store_true",
        help="return after one copy of each shard; peers copy the rest",
    )
    p.add_argument("--quorum", type=_positive, help="replicas to wait for (default k)")
    p.add_argument(
        "--shard-size",
        type=_shard_mib,
        default=16,
        metavar="MIB",
        help="largest shard in MiB (default 16)",
    )
    swarm(p)

    p = command("load", "load a model into a file or directory")
    p.add_argument("name")
    p.add_argument("--out", required=True, metavar="PATH")
    p.add_argument(
        "--tensors",
        nargs="+",
        action="extend",
        metavar="GLOB",
        help="only tensors matching these patterns (one safetensors file)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing PATH")
    swarm(p)

    swarm(command("ls", "list published models"))
    swarm(command("status", "peers, shards held and replicas short"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    handler = COMMANDS[args.command]
    try:
        result = asyncio.run(handler(args))
    except KeyboardInterrupt:
        return 130
    except (P2PShardError, OSError, ValueError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"p2pshard: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    if result is not None:
        _emit(args, result)
    return 0


def _emit(args: argparse.Namespace, result: dict[str, Any]) -> None:
    text = result.pop("_text", None)
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return
    print(text if text is not None else json.dumps(result, indent=2, sort_keys=True))


def _settings(args: argparse.Namespace) -> Settings:
    defaults = Settings()
    return Settings(
        replicas=args.replicas,
        write_quorum=getattr(args, "quorum", None),
        shard_size=getattr(args, "shard_size", 16) * MIB,
        repair_interval=getattr(args, "repair_interval", defaults.repair_interval),
        liveness_interval=getattr(
            args, "liveness_interval", defaults.liveness_interval
        ),
        scrub_rate=getattr(args, "scrub_rate", defaults.scrub_rate),
        handoff_timeout=getattr(args, "handoff_timeout", defaults.handoff_timeout),
    )


@contextlib.contextmanager
def _progress(
    args: argparse.Namespace, total: int, what: str
) -> Iterator[Callable[[int], None]]:
    if args.json or not sys.stderr.isatty():
        yield lambda n: None
        return
    with tqdm(
        total=total, unit="B", unit_scale=True, desc=what, file=sys.stderr
    ) as bar:
        yield bar.update


# --- commands ---------------------------------------------------------------


async def cmd_peer(args: argparse.Namespace) -> None:
    peer = Peer(
        args.data, args.host, args.port, args.bootstrap, _settings(args), args.capacity
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with peer:
        ready = {
            "event": "ready",
            "address": peer.address,
            "id": peer.node_id.hex(),
            "shards": len(peer.store),
        }
        if args.json:
            print(json.dumps(ready), flush=True)
        else:
            print(
                f"peer {ready['id'][:12]} ready at {peer.address} "
                f"holding {ready['shards']} shards",
                flush=True,
            )
        await stop.wait()
    return None


async def cmd_publish(args: argparse.Namespace) -> dict[str, Any]:
    check_name(args.name)
    _, files = scan_path(args.path)
    total = sum(f.size for f in files)
    async with Client(args.bootstrap, _settings(args)) as client:
        with _progress(args, total, "publish") as progress:
            result = await client.publish(
                args.path, args.name, args.asynchronous, progress
            )
    out = {
        "name": result.name,
        "version": result.version,
        "manifest": result.manifest,
        "files": result.files,
        "tensors": result.tensors,
        "bytes": result.bytes,
        "shards": result.shards,
        "spread": round(result.spread, 3),
        "seconds": round(result.seconds, 3),
        "mode": "async" if args.asynchronous else "sync",
    }
    out["_text"] = (
        f"published {result.name} v{result.version}: {result.files} files, "
        f"{result.tensors} tensors, {result.bytes / 1e6:.1f} MB in {result.shards} "
        f"shards ({result.seconds:.2f} s)"
    )
    return out


async def cmd_load(args: argparse.Namespace) -> dict[str, Any]:
    check_name(args.name)
    async with Client(args.bootstrap, _settings(args)) as client:
        record = await client.resolve(args.name)
        with _progress(args, record.size, "load") as progress:
            stats = await client.load_to(
                args.name, args.out, args.tensors, args.overwrite, progress
            )
    out: dict[str, Any] = stats.to_json()
    out["out"] = stats.path
    out["_text"] = (
        f"loaded {stats.name} v{stats.version} into {stats.path}: {stats.tensors} "
        f"tensors, {stats.bytes / 1e6:.1f} MB, {stats.shards} shards from "
        f"{stats.peers} peers in {stats.seconds:.2f} s "
        f"({stats.bytes / max(stats.seconds, 1e-9) / 1e6:.0f} MB/s)"
    )
    return out


async def cmd_ls(args: argparse.Namespace) -> dict[str, Any]:
    async with Client(args.bootstrap, _settings(args)) as client:
        records = await client.list()
    rows = [r.to_json() for r in records]
    lines = [f"{'NAME':40} {'VERSION':>7} {'SIZE':>12}  MANIFEST"]
    lines += [
        f"{r.name:40} {r.version:>7} {r.size:>12}  {r.manifest[:16]}" for r in records
    ]
    return {"models": rows, "_text": "\n".join(lines)}


async def cmd_status(args: argparse.Namespace) -> dict[str, Any]:
    async with Client(args.bootstrap, _settings(args)) as client:
        state = await client.status(args.replicas)
    lines = [
        f"peers: {state['peers']}  shards: {state['shards']}  copies: {state['copies']}"
        f"  replicas short (k={state['replicas']}): {state['replicas_short']}",
        f"{'PEER':24} {'SHARDS':>7} {'BYTES':>14}",
    ]
    for row in state["peer_list"]:
        lines.append(
            f"{row['host']}:{row['port']:<14} {row['shards']:>7} {row['bytes']:>14}"
        )
    state["_text"] = "\n".join(lines)
    return state


COMMANDS = {
    "peer": cmd_peer,
    "publish": cmd_publish,
    "load": cmd_load,
    "ls": cmd_ls,
    "status": cmd_status,
}

if __name__ == "__main__":
    sys.exit(main())
