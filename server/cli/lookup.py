"""`crs lookup`: resolve one key against a running node (an operator's smoke test).

A PAN or account number is read from standard input, never from the command line where shell
history would keep it. `crs-dev lookup` (devstack/cli.py) adds --demo N on top of this module.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.cli.base import RAW, CommandFailed, seconds

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 5.0   # seconds: generous for a human at a terminal; a node answers in about a millisecond
CERT, KEY = "CERTIFICATE", "PRIVATE KEY"    # the PEM blocks --ca/--cert and --key must hold


def add_arguments(s: argparse.ArgumentParser) -> None:
    """The target, TLS and key arguments `crs lookup` and `crs-dev lookup` share."""
    s.add_argument("kind", choices=("card", "account", "customer"))
    s.add_argument("--token", help="card token (card lookups)")
    s.add_argument("--routing", help="ABA routing number (account lookups; account number from stdin)")
    s.add_argument("--customer-id", help="customer id (customer lookups)")
    s.add_argument("--timeout", type=seconds, default=DEFAULT_TIMEOUT, help=f"seconds (default {DEFAULT_TIMEOUT:g})")
    add_connection_arguments(s)


def node_target(text: str) -> str:
    """An argparse `type=` for --target: a gRPC target has no space or control character in it. An
    empty one let grpc's C core print its own lines on stderr before the one-line error (exit 1, as if
    a node did not answer); refused while parsing, exit 2."""
    if not text or any(c.isspace() or not c.isprintable() for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a node address (HOST:PORT, ipv4:A:P,B:P or"
                                         " dns:///NAME:PORT)")
    return text


def add_connection_arguments(s: argparse.ArgumentParser, *, client: str = "switch") -> None:
    """How any `crs` command that calls a node reaches it: --target, TLS (--tls-dir/--client or
    --ca/--cert/--key) and a bearer token; `open_channel` turns them into a channel."""
    s.add_argument("--target", type=node_target, default=DEFAULT_TARGET, help=(
        f"node address (default {DEFAULT_TARGET}); several: ipv4:A:P,B:P or dns:///HEADLESS-SERVICE:P"
        " (then health-checked, docs/deploy.md)"))
    s.add_argument("--tls-dir", help="a dev PKI directory (crs-dev up prints it): ca.pem + client-NAME.pem/.key")
    s.add_argument("--client", default=client, help=f"client certificate name in --tls-dir (default {client})")
    s.add_argument("--ca", help="CA certificate (PEM) to verify the server; enables TLS (without it or"
                                " --tls-dir: plaintext)")
    s.add_argument("--cert", help="client certificate chain (PEM) for mutual TLS; with --key and --ca")
    s.add_argument("--key", help="client private key (PEM) for mutual TLS; with --cert and --ca")
    s.add_argument("--server-name", help="the name the server's certificate must carry, when --target does"
                                         " not say it (a kubectl port-forward to 127.0.0.1: crs-node.crs.svc)")
    s.add_argument("--token-file", help="file holding a bearer token (JWT) to send; needs TLS (--ca or"
                                        " --tls-dir): refused over plaintext, where it would travel in clear")


def rpc_failed(exc: Any) -> int:
    """A gRPC error as every command prints it, `CODE: details` on stderr; exit status 1."""
    print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
    return 1


def from_stdin() -> str:
    return sys.stdin.readline().strip()


def run(args: argparse.Namespace, *, pan: Callable[[], str] = from_stdin,
        account_number: Callable[[], str] = from_stdin, customer_id: Callable[[], str] | None = None) -> int:
    """Call the RPC `args.kind` names and print its answer as JSON; a gRPC error as `CODE: details`."""
    import grpc
    from google.protobuf.json_format import MessageToJson

    from server import rpc
    from server.proto import crs_pb2 as pb

    with open_channel(args) as channel:
        lookup = rpc.stub(channel, "LookupService")
        try:
            if args.kind == "card":
                request = (pb.ResolveCardRequest(token=args.token) if args.token
                           else pb.ResolveCardRequest(pan=pan()))
                reply = lookup.ResolveCard(request, timeout=args.timeout)
            elif args.kind == "account":
                number = account_number()
                reply = lookup.ResolveAccount(pb.ResolveAccountRequest(routing_number=args.routing or "",
                                                                       account_number=number), timeout=args.timeout)
            else:
                cid = customer_id() if customer_id is not None else (args.customer_id or "")
                reply = lookup.GetCustomer(pb.GetCustomerRequest(customer_id=cid), timeout=args.timeout)
        except grpc.RpcError as exc:
            return rpc_failed(exc)
    print(MessageToJson(reply, indent=2))
    return 0


def open_channel(args: argparse.Namespace) -> Any:
    import grpc

    from server.client_config import channel_options

    # The recommended configuration (docs/deploy.md, "Clients"), failing fast: a command makes one call
    # and says at once that a node is unreachable, where a switch would wait for it within a deadline.
    options = list(channel_options(args.target, wait_for_ready=False))
    credentials = channel_credentials(args)
    if credentials is None:
        if args.server_name:
            raise CommandFailed("--server-name needs TLS (--ca or --tls-dir): it names the server's certificate", 2)
        return grpc.insecure_channel(args.target, options=options)
    if args.server_name:
        options.append(("grpc.ssl_target_name_override", args.server_name))
    return grpc.secure_channel(args.target, credentials, options=options)


def channel_credentials(args: argparse.Namespace) -> Any:
    """The TLS (and bearer token) credentials the connection arguments name, None for plaintext; a
    file that cannot be read, or a flag that would be silently ignored, is CommandFailed exit 2
    naming the flag. A token without TLS is refused rather than sent: over plaintext every hop
    would read it, and a caller who named a token meant a secure channel."""
    import grpc

    given = [flag for flag, value in (("--ca", args.ca), ("--cert", args.cert), ("--key", args.key)) if value]
    if args.tls_dir and given:
        raise CommandFailed(f"--tls-dir and {'/'.join(given)} both name TLS files: give one or the other", 2)
    ca: Path | str | None
    if args.tls_dir:
        tls, name = Path(args.tls_dir), args.client
        flags = (f"--tls-dir (--client {name})",) * 3
        ca, cert, key = tls / "ca.pem", tls / f"client-{name}.pem", tls / f"client-{name}.key"
    else:
        if (args.cert or args.key) and not args.ca:
            raise CommandFailed("--cert/--key need --ca: without it the channel is plaintext and no client"
                                " certificate is sent", 2)
        if bool(args.cert) != bool(args.key):
            raise CommandFailed("--cert and --key go together (a client certificate and its private key)", 2)
        flags = ("--ca", "--cert", "--key")
        ca, cert, key = args.ca, args.cert, args.key
    if not ca:
        if args.token_file:
            raise CommandFailed("--token-file needs TLS (--ca or --tls-dir): a bearer token over plaintext would"
                                " be sent in clear", 2)
        return None
    creds = grpc.ssl_channel_credentials(root_certificates=_read(flags[0], ca, CERT),
                                         private_key=_read(flags[2], key, KEY) if key else None,
                                         certificate_chain=_read(flags[1], cert, CERT) if cert else None)
    if not args.token_file:
        return creds
    return grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(bearer_token(args.token_file)))


def _read(flag: str, path: str | Path, pem: str = "") -> bytes:
    """The file's bytes; with `pem` (CERTIFICATE, PRIVATE KEY) it must hold such a PEM block, or gRPC
    would log its own lines and fail the call with UNAVAILABLE, as if the node were down."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CommandFailed(f"{flag}: cannot read {path}: {exc.strerror or type(exc).__name__}", 2) from None
    if pem and not (b"-----BEGIN " in data and f"{pem}-----".encode() in data):
        raise CommandFailed(f"{flag}: {path} holds no PEM {pem.lower()}", 2)
    return data


def bearer_token(path: str) -> str:
    """The token in `path`, stripped; the message of a file that is no token never holds its content."""
    try:
        token = _read("--token-file", path).decode("ascii").strip()
    except UnicodeDecodeError:
        raise CommandFailed(f"--token-file: {path} is not a token (non-ASCII bytes)", 2) from None
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise CommandFailed(f"--token-file: {path} is not a token (empty, or more than one word)", 2)
    return token


def cmd_lookup(args: argparse.Namespace) -> int:
    return run(args)


def register(sub: Any) -> None:
    s = sub.add_parser("lookup", help="call LookupService on a running node", description=(
        "Resolve one key against a node. A PAN or account number is read from standard input (never\n"
        "from the command line, where shell history would keep it). Demo keys: crs-dev lookup --demo N."),
        formatter_class=RAW)
    add_arguments(s)
    s.set_defaults(func=cmd_lookup)
