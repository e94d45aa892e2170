"""Small helpers over the aetcd client that every service needs.

- connect(): a client for "host:port", waiting for etcd to answer; over TLS
  and as an etcd user when EtcdAccess says so (flags: add_etcd_args).
- PrefixMirror: a local copy of every key under a prefix, kept current by a
  watch that resumes after errors (etcd restarts included).
- LeasedKeys: keys that live as long as this process keeps its lease alive.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import aetcd
import grpc
from aetcd import rpc, watcher

from services.common.tls import TlsConfigError, TlsFiles, aio_channel, client_tls

log = logging.getLogger(__name__)

# The etcd user's password comes from the environment, never a flag: flags are in the process list.
ETCD_PASSWORD_ENV = "PRISM_ETCD_PASSWORD"


@dataclass(frozen=True)
class EtcdAccess:
    """How to reach etcd beyond its address: TLS (ca verifies etcd; cert/key
    is the client certificate etcd's --client-cert-auth asks for) and an
    etcd user. The default is plaintext without a user."""

    tls: TlsFiles | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.user is None) != (self.password is None):
            raise TlsConfigError(
                f"an etcd user needs its password in ${ETCD_PASSWORD_ENV}"
                if self.user is not None
                else "an etcd password needs --etcd-user"
            )


def etcd_access(
    ca: str | os.PathLike | None = None,
    cert: str | os.PathLike | None = None,
    key: str | os.PathLike | None = None,
    user: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> EtcdAccess:
    """EtcdAccess from the --etcd-* options; the password from $PRISM_ETCD_PASSWORD when a user is given."""
    tls = client_tls(ca, cert, key, options="--etcd")
    if user is None:
        return EtcdAccess(tls)
    password = environ.get(ETCD_PASSWORD_ENV)
    if password is None:
        raise TlsConfigError(f"--etcd-user {user} needs its password in the environment variable {ETCD_PASSWORD_ENV}")
    return EtcdAccess(tls, user, password)


def add_etcd_args(parser: argparse.ArgumentParser) -> None:
    """The etcd access flags every service shares (--etcd itself stays the service's own)."""
    group = parser.add_argument_group(
        "etcd access", f"TLS and user of the etcd connection (the user's password: ${ETCD_PASSWORD_ENV})"
    )
    group.add_argument(
        "--etcd-ca", default=None, metavar="PEM", help="CA certificate that verifies etcd (turns TLS on)"
    )
    group.add_argument(
        "--etcd-cert",
        default=None,
        metavar="PEM",
        help="client certificate for an etcd with --client-cert-auth (turns TLS on)",
    )
    group.add_argument("--etcd-key", default=None, metavar="PEM", help="the private key of --etcd-cert")
    group.add_argument("--etcd-user", default=None, help=f"etcd user (password from ${ETCD_PASSWORD_ENV})")


def etcd_access_from_args(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> EtcdAccess:
    return etcd_access(args.etcd_ca, args.etcd_cert, args.etcd_key, args.etcd_user, environ)


def etcd_access_args(access: EtcdAccess) -> list[str]:
    """The flags that give a service this access (the password travels in its environment)."""
    out = []
    tls = access.tls
    for flag, path in (
        ("--etcd-ca", tls and tls.ca),
        ("--etcd-cert", tls and tls.cert),
        ("--etcd-key", tls and tls.key),
    ):
        if path is not None:
            out += [flag, str(path)]
    return out + (["--etcd-user", access.user] if access.user is not None else [])


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """ "127.0.0.1:2379" or "http://127.0.0.1:2379" -> ("127.0.0.1", 2379)."""
    rest = endpoint.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"etcd endpoint must be host:port, got {endpoint!r}")
    return host, int(port)


class EtcdLoginRefused(Exception):
    """etcd refused the user or password (or has authentication off). Not a
    ConnectionError, which callers retry: waiting cannot fix this."""


async def connect(endpoint: str, timeout_s: float = 30.0, access: EtcdAccess = EtcdAccess()) -> aetcd.Client:
    """Returns a connected client, retrying until etcd answers or timeout_s
    (then ConnectionError). A refused login raises EtcdLoginRefused at once."""
    host, port = parse_endpoint(endpoint)
    deadline = time.monotonic() + timeout_s
    while True:
        if access.tls is None and access.user is None:
            client = aetcd.Client(host=host, port=port, timeout=5)
        else:
            client = _SecuredClient(host, port, access, timeout=5)
        try:
            await client.connect()
            await client.status()
            return client
        except Exception as exc:  # aetcd wraps grpc errors in its own types
            await client.close()
            if _refused_login(exc):
                raise EtcdLoginRefused(f"etcd at {endpoint} refused user {access.user!r}: {exc}") from exc
            if time.monotonic() > deadline:
                raise ConnectionError(f"etcd at {endpoint} did not answer within {timeout_s:.0f}s: {exc}") from exc
            await asyncio.sleep(0.3)


def _refused_login(exc: Exception) -> bool:
    text = str(exc)
    return "authentication failed" in text or "authentication is not enabled" in text


# etcd's answers to a token it no longer knows (restarted; unused for its TTL) or from an older auth revision.
_STALE_TOKEN_ERRORS = ("invalid auth token", "auth store is old")
_AUTHENTICATE_METHOD = "/etcdserverpb.Auth/Authenticate"


class _EtcdToken:
    """The auth token of one etcd user, fetched when first needed and again when etcd no longer knows it."""

    def __init__(self, user: str, password: str):
        self._user = user
        self._password = password
        self.value: str | None = None
        self.auth_stub: rpc.AuthStub | None = None  # set once the channel exists
        self._lock = asyncio.Lock()

    async def current(self, stale: str | None = None) -> str:
        """The token; a new one when the caller's `stale` token is still the current one."""
        async with self._lock:  # concurrent callers that all hit a stale token authenticate once
            if self.value is None or self.value == stale:
                assert self.auth_stub is not None
                reply = await self.auth_stub.Authenticate(
                    rpc.AuthenticateRequest(name=self._user, password=self._password), timeout=5
                )
                self.value = reply.token
            return self.value


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), ("token", token))
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


def _method_name(details: grpc.aio.ClientCallDetails) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else method


class _UnaryTokenInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Sends the user's current token with every unary call; one refused for
    a stale token is sent once more with a fresh one."""

    def __init__(self, token: _EtcdToken):
        self._token = token

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        if _method_name(client_call_details) == _AUTHENTICATE_METHOD:
            return await continuation(client_call_details, request)
        token = await self._token.current()
        call = await continuation(_with_token(client_call_details, token), request)
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            if not any(text in (exc.details() or "") for text in _STALE_TOKEN_ERRORS):
                raise
            log.info("etcd no longer knows this client's auth token; authenticating again")
            fresh = await self._token.current(stale=token)
            return await continuation(_with_token(client_call_details, fresh), request)
        return call


class _StreamTokenInterceptor(grpc.aio.StreamStreamClientInterceptor):
    """Sends the user's current token with every bidirectional stream (watches,
    lease keep-alives). A stream refused for a stale token fails; its owner's
    retry follows a unary call (a reload, a new lease) that renewed the token."""

    def __init__(self, token: _EtcdToken):
        self._token = token

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_token(client_call_details, await self._token.current()), request_iterator)


class _ServerStreamTokenInterceptor(grpc.aio.UnaryStreamClientInterceptor):
    """The same for server streams (a snapshot)."""

    def __init__(self, token: _EtcdToken):
        self._token = token

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_token(client_call_details, await self._token.current()), request)


class _CancelAwareWatcher(watcher.Watcher):
    """aetcd's watcher ignores etcd canceling a watch, so a watch etcd refused
    (permission denied: a token it no longer knows, after a restart) would
    wait forever. This one fails every watch of the stream instead and drops
    the stream: its owners watch again, on a new stream with the current token."""

    async def _handle_response(self, response) -> None:
        if response.canceled and response.cancel_reason and not response.compact_revision:
            error = aetcd.exceptions.ClientError(f"etcd canceled the watch: {response.cancel_reason}")
            # From a task of its own: ending the stream cancels and awaits the task running this handler.
            asyncio.get_running_loop().create_task(self._terminate_stream(error))
            return
        await super()._handle_response(response)


class _SecuredClient(aetcd.Client):
    """An aetcd client over TLS and/or as an etcd user. aetcd 1.0 opens only
    plaintext channels and authenticates once, at connect (its token then
    dies with an etcd restart), so this client opens the channel itself:
    TLS from access.tls, the user's token from an interceptor that renews it.
    Everything after the channel is aetcd's own."""

    def __init__(self, host: str, port: int, access: EtcdAccess, timeout: int | None = None):
        super().__init__(host=host, port=port, timeout=timeout)
        self._access = access

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        token = None
        interceptors = []
        if self._access.user is not None and self._access.password is not None:
            token = _EtcdToken(self._access.user, self._access.password)
            # grpc.aio files each interceptor under one call kind: one object per kind aetcd uses.
            interceptors += [
                _UnaryTokenInterceptor(token),
                _StreamTokenInterceptor(token),
                _ServerStreamTokenInterceptor(token),
            ]
        target = f"{self._host}:{self._port}"
        options = list(self._options.items())
        if token is not None:
            # gRPC may replay a broken watch stream to a restarted etcd with its old, now unknown token;
            # etcd then cancels the watch, which aetcd does not report. Without retries the stream fails
            # instead and its owner watches again with a fresh token.
            options.append(("grpc.enable_retries", 0))
        channel = aio_channel(target, self._access.tls, options=options, interceptors=interceptors)
        if token is not None:
            token.auth_stub = rpc.AuthStub(channel)
        # The stubs and watcher aetcd.Client.connect would make, over this channel.
        self.channel = channel
        self.kvstub = rpc.KVStub(channel)
        self.clusterstub = rpc.ClusterStub(channel)
        self.leasestub = rpc.LeaseStub(channel)
        self.maintenancestub = rpc.MaintenanceStub(channel)
        self._watcher = _CancelAwareWatcher(rpc.WatchStub(channel), timeout=self._timeout)
        self._connected.set()


OnChange = Callable[[str, bytes | None], Awaitable[None] | None]


class PrefixMirror:
    """Mirrors every key under `prefix` into `self.items` (key -> value bytes).

    run() loads the prefix, then follows a watch from the loaded revision, so
    no change between the two is missed. On any error it reloads from scratch
    after a short pause, which also covers a restarted etcd. `on_change(key,
    value_or_None)` is called for every change after the first load;
    `ready` is set once the first load is done.
    """

    def __init__(self, client: aetcd.Client, prefix: str, on_change: OnChange | None = None):
        self._client = client
        self.prefix = prefix
        self.items: dict[str, bytes] = {}
        self.ready = asyncio.Event()
        self._on_change = on_change

    async def _notify(self, key: str, value: bytes | None) -> None:
        if self._on_change is not None:
            result = self._on_change(key, value)
            if asyncio.iscoroutine(result):
                await result

    async def run(self) -> None:
        while True:
            try:
                await self._load_and_follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("watch on %s lost (%s); reloading", self.prefix, exc)
                await asyncio.sleep(0.5)

    async def _load_and_follow(self) -> None:
        result = await self._client.get_prefix(self.prefix.encode())
        fresh = {kv.key.decode(): kv.value for kv in result}
        old = self.items
        self.items = fresh
        if self.ready.is_set():  # a reload: report what changed while we were away
            for key in old.keys() - fresh.keys():
                await self._notify(key, None)
            for key, value in fresh.items():
                if old.get(key) != value:
                    await self._notify(key, value)
        self.ready.set()
        revision = result.header.revision
        watch = await self._client.watch_prefix(self.prefix.encode(), start_revision=revision + 1)
        async for event in watch:
            key = event.kv.key.decode()
            if event.kind == aetcd.EventKind.DELETE:
                self.items.pop(key, None)
                await self._notify(key, None)
            else:
                self.items[key] = event.kv.value
                await self._notify(key, event.kv.value)


class LeasedKeys:
    """Keys that exist while this process is alive.

    They are written under one lease that run() refreshes every ttl/3
    seconds. When the lease is lost (etcd restarted, a long pause) a new
    lease is granted and every key is written again.
    """

    def __init__(self, client: aetcd.Client, ttl_s: int = 5):
        self._client = client
        self.ttl_s = ttl_s
        self._values: dict[str, bytes] = {}
        self._lease: aetcd.Lease | None = None
        self._lock = asyncio.Lock()

    async def put(self, key: str, value: bytes) -> None:
        async with self._lock:
            self._values[key] = value
            if self._lease is None:
                await self._new_lease()
            else:
                await self._client.put(key.encode(), value, lease=self._lease)

    async def delete(self, key: str) -> None:
        async with self._lock:
            self._values.pop(key, None)
            await self._client.delete(key.encode())

    async def _new_lease(self) -> None:
        self._lease = await self._client.lease(self.ttl_s)
        for key, value in self._values.items():
            await self._client.put(key.encode(), value, lease=self._lease)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                async with self._lock:
                    if self._lease is None:
                        await self._new_lease()
                        continue
                    reply = await self._lease.refresh()
                    if reply is None or reply.TTL <= 0:  # expired: the keys are gone, write them anew
                        log.warning("etcd lease %s expired; registering again", self._lease.id)
                        await self._new_lease()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("lease keep-alive failed (%s); retrying", exc)
                self._lease = None

    async def revoke(self) -> None:
        """Removes every key at once (a clean shutdown)."""
        async with self._lock:
            if self._lease is not None:
                try:
                    await self._lease.revoke()
                finally:
                    self._lease = None
