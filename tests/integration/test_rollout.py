"""A rolling restart of every node process under load, with the client configuration we recommend
(server/client_config.py: round robin over the nodes, client-side health checking, retries on
UNAVAILABLE and CANCELLED), fails no call; so do workers drained one by one behind one address, and
a reconnect reset there (calls wait for ready); a dead single address costs calls their deadline.
Nodes drain on SIGTERM (NOT_SERVING, then finish in-flight calls) and send GOAWAY after
CRS_MAX_CONNECTION_AGE, so clients also move their connections on their own."""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc

from devstack.demo import demo_pan
from devstack.environment import DevEnvironment, NodeProcess, open_channel
from server import rpc
from server.client_config import CHANNEL_OPTIONS, channel_options, multi_target
from server.proto import crs_pb2 as pb
from tests.integration.support import Clients, FreezingProxy, until, worker_pids

NODES = 3
# A drain that fails calls fails them at once (UNAVAILABLE) or holds them, waiting for a ready
# connection, until their deadline. 5 s, not 2: with the suite on two workers one call in six runs
# reached a 2 s deadline in the draining-workers test while the other worker's servers kept the
# machine busy (not reproduced with both cores busy in 11 runs of it alone; the failure message now
# says which call, when it was sent and when it ended, against the SIGTERMs).
CALL_TIMEOUT = 5.0


class Load:
    """Threads of ResolveCard (hits and misses alike) and CreateCustomer writes with request ids,
    counting every failed call."""

    def __init__(self, channel: grpc.Channel, threads: int = 3) -> None:
        self.lookup = rpc.stub(channel, "LookupService")
        self.admin = rpc.stub(channel, "AdminService")
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.written: list[str] = []
        self.threads = [threading.Thread(target=self.run, args=(t,), daemon=True) for t in range(threads)]
        self.started = time.monotonic()

    def at(self) -> str:
        """Now, as seconds since the load started: failures and the events a test records say when."""
        return f"+{time.monotonic() - self.started:.2f} s"

    def run(self, t: int) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            write = i % 10 == 0
            sent, method = self.at(), "CreateCustomer" if write else "ResolveCard"
            try:
                if write:
                    request_id = f"rollout-{t}-{i}"
                    c = self.admin.CreateCustomer(pb.CreateCustomerRequest(request_id=request_id,
                                                                           display_name="Rollout"),
                                                  timeout=CALL_TIMEOUT)
                    self.written.append(c.customer_id)
                else:
                    self.lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan((t * 97 + i) % 300)),
                                            timeout=CALL_TIMEOUT)
                self.ok += 1
            except grpc.RpcError as exc:
                self.failures.append(f"{exc.code().name}: {exc.details()} ({method} sent {sent}, ended {self.at()})")

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def test_rolling_restart_under_load_fails_no_call(dev_env: DevEnvironment) -> None:
    overrides: dict[str, object] = {"max_connection_age": 2.0, "grace_seconds": 5.0, "drain_delay": 1.0}
    nodes: list[NodeProcess] = [dev_env.start_node(workers=1, **overrides) for _ in range(NODES)]
    ports = [n.settings.grpc_port for n in nodes]
    channel = open_channel(multi_target([n.address for n in nodes]), dev_env.pki, "admin", CHANNEL_OPTIONS)
    try:
        with Load(channel) as load:
            time.sleep(1.0)
            for k, port in enumerate(ports):
                # Replace node k as a rollout does: the old one drains (SIGTERM), a new one starts
                # on its address.
                old = nodes[k]
                code = old.stop()
                assert code == 0, f"the node did not drain (exit {code})\n{old.log_tail()}"
                dev_env.nodes.remove(old)
                nodes[k] = dev_env.start_node(workers=1, port=port, **overrides)
                time.sleep(1.0)
            time.sleep(1.0)
        assert load.failures == [], load.failures[:5]
        assert load.ok > 100 and len(load.written) > 5
        # Every accepted write is there (and once: request ids made retries replay, not rewrite).
        lookup = rpc.stub(channel, "LookupService")
        for customer_id in load.written:
            assert lookup.GetCustomer(pb.GetCustomerRequest(customer_id=customer_id), timeout=5).customer.customer_id
    finally:
        channel.close()
        for n in nodes:
            if n in dev_env.nodes:
                n.stop()
                dev_env.nodes.remove(n)


def test_behind_one_address_draining_workers_fail_no_call(dev_env: DevEnvironment) -> None:
    """One address standing for several servers, as an L4 load balancer's VIP or a ClusterIP stands
    for nodes: here one node's two workers sharing a port. Each drains in turn (SIGTERM; the node
    starts a new one). A channel with the recommended configuration for one address
    (`channel_options`: no health checking) fails no call. With health checking it failed every call
    for the drain delay (302 of 3,600 in an outside check): NOT_SERVING left it no address to use."""
    node = dev_env.start_node(workers=2, grace_seconds=5.0, drain_delay=1.0)
    channel = open_channel(node.address, dev_env.pki, "admin", channel_options(node.address))
    try:
        with Load(channel) as load:
            time.sleep(1.0)
            workers = worker_pids(node)
            assert len(workers) == 2, workers
            events = []
            for victim in sorted(workers):
                started = node.log_path.read_text().count('"node serving"')
                os.kill(victim, signal.SIGTERM)
                events.append(f"SIGTERM {victim} {load.at()}")
                deadline = time.monotonic() + 60
                while node.log_path.read_text().count('"node serving"') == started:   # its successor is up
                    assert time.monotonic() < deadline, f"no worker took over from {victim}\n{node.log_tail()}"
                    time.sleep(0.1)
                events.append(f"successor serving {load.at()}")
                time.sleep(1.0)
        assert load.failures == [], (load.failures[:5], events, node.log_tail(60))
        assert load.ok > 100 and len(load.written) > 5
    finally:
        channel.close()
        node.stop()
        dev_env.nodes.remove(node)


def reset_reconnects(node: NodeProcess, options: tuple[tuple[str, object], ...], times: int = 3) -> Load:
    """Load through one address (a proxy in front of `node`) whose connection is reset `times` times
    together with the channel's next connection attempt: what a client behind one address meets when a
    draining worker's listener closes with its new connection still queued or mid-handshake."""
    with FreezingProxy(node.settings.grpc_port) as proxy:
        target = f"127.0.0.1:{proxy.port}"
        channel = open_channel(target, node.pki, "admin", options)
        try:
            with Load(channel) as load:
                until("calls answered", lambda: load.ok > 20, within=10)
                for k in range(times):
                    proxy.reset(next_connections=1)
                    accepted, ok = 1 + 2 * (k + 1), load.ok + 20   # the first, then a reset and a good one each
                    until("the channel reconnected",
                          lambda a=accepted, o=ok: proxy.accepted >= a and load.ok > o, within=10)
            assert proxy.reset_connections == times
        finally:
            channel.close()
    return load


def test_behind_one_address_a_reset_reconnect_fails_no_call(node_a: Clients) -> None:
    """The drain test above, made deterministic: the channel's one connection is reset and so is its
    first attempt to reconnect. gRPC then waits its reconnect backoff (1 s) before trying again, and
    with its default fail-fast calls every call meanwhile fails UNAVAILABLE (the control, below:
    thousands of them). The recommended single-address configuration waits for the channel to be
    ready (`waitForReady`, within the call's deadline) and starts reconnecting after 100 ms."""
    load = reset_reconnects(node_a.node, channel_options("127.0.0.1:1"))
    assert load.failures == [], (len(load.failures), load.failures[:3])
    # The control: fail fast (as the `crs` CLI), with gRPC's own reconnect backoff.
    options = tuple(o for o in channel_options("127.0.0.1:1", wait_for_ready=False) if "reconnect_backoff" not in o[0])
    control = reset_reconnects(node_a.node, options, times=1)
    assert control.failures and all(f.startswith("UNAVAILABLE") for f in control.failures), control.failures[:3]


def test_behind_one_address_a_dead_node_fails_calls_at_their_deadline_and_is_used_again_promptly(
        dev_env: DevEnvironment) -> None:
    """What waiting for ready costs, and the reconnect backoff's bound: with its one address dead
    (SIGKILL, nothing listening) a call fails DEADLINE_EXCEEDED at its deadline, not at once; when a
    node serves there again the channel uses it within ~2 s (reconnect attempts at most 2 s apart),
    however long the outage. With gRPC's defaults the attempts back off to 2 minutes apart: after
    this outage's ~10 s the next could come 6 s after the node's return."""
    node = dev_env.start_node(workers=1)
    port = node.settings.grpc_port
    channel = open_channel(node.address, dev_env.pki, "admin", channel_options(node.address))
    lookup = rpc.stub(channel, "LookupService")
    request = pb.ResolveCardRequest(pan=demo_pan(1))
    try:
        lookup.ResolveCard(request, timeout=5)
        os.killpg(node.proc.pid, signal.SIGKILL)
        node.proc.wait()
        dev_env.nodes.remove(node)
        outage: list[tuple[str, float]] = []
        until_back = time.monotonic() + 4.0
        while time.monotonic() < until_back:       # the channel keeps trying meanwhile, backing off
            started = time.monotonic()
            try:
                lookup.ResolveCard(request, timeout=0.3)
            except grpc.RpcError as exc:
                outage.append((exc.code().name, time.monotonic() - started))
        assert outage and {code for code, _ in outage} == {"DEADLINE_EXCEEDED"}, outage[:3]
        assert min(took for _, took in outage) >= 0.29, outage[:3]
        node = dev_env.start_node(workers=1, port=port)     # "node serving" when it returns
        serving = time.monotonic()
        while True:
            try:
                lookup.ResolveCard(request, timeout=0.3)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc
                assert time.monotonic() - serving < 10, "the channel did not come back"
        back = time.monotonic() - serving
        print(f"outage: {len(outage)} calls failed DEADLINE_EXCEEDED; back {back:.2f} s after the node served")
        assert back < 3.0, back                    # 2 s, +20% jitter, a handshake and one call
    finally:
        channel.close()
        if node in dev_env.nodes:
            node.stop()
            dev_env.nodes.remove(node)
