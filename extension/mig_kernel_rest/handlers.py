"""The jupyter_server extension's handlers: a REST API under ``<base_url>mig/api/`` for the
JupyterLab extension (labextension/) and anyone with the server's token. The package
(``mig_kernel_rest/__init__.py``) names the module jupyter_server loads.

Routes (each verb ``@web.authenticated`` and ``@authorized`` on the ``kernels`` resource,
as jupyter_server's own kernel handlers):

- ``GET slices[?after=SEQ&timeout=S]``: the broker's status for this user (own leases in
  full, others anonymized), its ``seq`` and this user's ``pseudonym``; each slice held by a
  kernel of this server carries that ``kernel_id``. With ``after`` it is a long poll: it
  answers once the watch stream's seq differs from ``after`` (or after ``timeout`` seconds).
- ``GET kernels/<id>/lease``: the slice a kernel of this server holds or waits for.
- ``POST kernels/<id>/release``: suspend that lease (its device data is spilled; the
  kernel's next GPU cell leases a slice again and restores it, as ``%gpu release`` does).

Identity: the server talks to the broker as the server's OS user (a single-user server,
which is what reading the 0600 ``broker.json`` proves). Under JupyterHub the hub user's
identity will go with each request instead.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import math
import weakref
from collections.abc import Callable, Iterable
from http.client import responses
from typing import TYPE_CHECKING, Any, TypeVar

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web
from traitlets import Float, Unicode
from traitlets.config import LoggingConfigurable

from mig_kernel.wire.errors import MigKernelError

if TYPE_CHECKING:
    from jupyter_server.serverapp import ServerApp

    from mig_kernel.client import BrokerClient

    from .broker_link import BrokerPool, StateFeed

T = TypeVar("T")

API_PATH = "mig/api"
SETTINGS_KEY = "mig_kernel_api"  # this server's MigKernelApi in the tornado settings
KERNEL_TAG = "kernel:"  # the provisioner's lease tag is kernel:<kernel_id>
LONG_POLL_DEFAULT = 25.0  # seconds
LONG_POLL_MAX = 60.0
FEED_START_WAIT = 3.0  # seconds the first request waits for the watch stream's seq

# Broker error codes (wire/errors.py) -> HTTP status; others are 500.
STATUS_FOR_CODE = {
    "broker_unavailable": 503,
    "lease_not_found": 404,
    "lease_ended": 404,
    "not_permitted": 403,
    "bad_request": 400,
    "malformed_message": 400,
    "quota_exceeded": 409,
    "no_capacity": 409,
    "slice_unavailable": 409,
    "bad_signature": 502,  # the broker refused the server's own session
    "replayed_message": 502,
    "internal_error": 502,
}

LEASE_FIELDS = ("id", "created", "idle_timeout")
SLICE_FIELDS = ("id", "uuid", "profile", "isolation", "memory_total")


class MigKernelApi(LoggingConfigurable):
    """The extension's settings (``c.MigKernelApi.*`` in jupyter_server_config.py) and what
    it keeps per server: the broker clients and the watch feed, both made on first use so a
    server whose users never look at slices never talks to the broker."""

    broker = Unicode(
        None,
        allow_none=True,
        help="The broker's connection file (None: $MIG_KERNEL_BROKER, else broker.json in the "
        "default state dir, as for kernels).",
    ).tag(config=True)
    broker_timeout = Float(
        5.0, help="Seconds a request waits for the broker before answering 503."
    ).tag(config=True)

    _pool: BrokerPool | None = None
    _feed: StateFeed | None = None

    @property
    def pool(self) -> BrokerPool:
        if self._pool is None:
            from .broker_link import BrokerPool

            self._pool = BrokerPool(self.broker, timeout=self.broker_timeout)
        return self._pool

    async def call(self, fn: Callable[[BrokerClient], T]) -> T:
        """``fn`` with a broker client, on a worker thread (the loop never blocks on ZeroMQ)."""
        return await asyncio.to_thread(self.pool.call, fn)

    async def feed(self) -> StateFeed:
        """The watch feed, started on the first request (which waits briefly for its seq)."""
        if self._feed is None or not self._feed.alive:
            from .broker_link import StateFeed

            self._feed = StateFeed(self.broker, asyncio.get_running_loop(), on_stop=self.close)
            self._feed.start()
            _running.add(self)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._feed.ready.wait(), FEED_START_WAIT)
        return self._feed

    def close(self) -> None:
        """Stop the feed and close the broker clients (the feed calls this when it ends)."""
        feed, self._feed = self._feed, None
        if feed is not None:
            feed.stop(timeout=2.0)
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()


_running: weakref.WeakSet[MigKernelApi] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for api in list(_running):
        api.close()


def load(serverapp: ServerApp) -> None:
    """Add the handlers and this server's MigKernelApi (see ``_load_jupyter_server_extension``)."""
    api = MigKernelApi(parent=serverapp, log=serverapp.log)
    web_app = serverapp.web_app
    web_app.settings[SETTINGS_KEY] = api
    base = url_path_join(web_app.settings["base_url"], API_PATH)
    kernel = r"/kernels/(?P<kernel_id>[^/]+)"  # any text: an unknown id gets our JSON 404
    web_app.add_handlers(
        ".*$",
        [
            (url_path_join(base, "slices"), SlicesHandler),
            (url_path_join(base, kernel, "lease"), KernelLeaseHandler),
            (url_path_join(base, kernel, "release"), KernelReleaseHandler),
            (url_path_join(base, r"/leases/(?P<lease_id>[^/]+)/release"), LeaseReleaseHandler),
        ],
    )
    serverapp.log.info("mig-kernel: GPU slice API at %s", base)


# --------------------------------------------------------------------------------- errors
class ApiError(web.HTTPError):
    """An error whose ``message`` reaches the client as is (tornado reads an HTTPError's
    log_message as a %-format, and a broker's message may hold a '%')."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(status)
        self.message = message
        self.code = code


def broker_error(exc: MigKernelError) -> ApiError:
    return ApiError(STATUS_FOR_CODE.get(exc.code, 500), str(exc), exc.code)


# ---------------------------------------------------------------------------------- views
def kernel_of(tag: str | None, kernels: Iterable[str]) -> str | None:
    """The kernel of this server that a lease tag names, if any."""
    if not tag or not tag.startswith(KERNEL_TAG):
        return None
    kernel_id = tag[len(KERNEL_TAG) :]
    return kernel_id if kernel_id in kernels else None


def node_view(
    status: dict[str, Any],
    seq: int,
    pseudonym: str | None,
    kernels: Iterable[str],
    admin: bool = False,
) -> dict[str, Any]:
    """``GET slices``: status plus seq, pseudonym and whether the viewer is a broker admin
    (who may release any lease: ``POST leases/<id>/release``); one's own slices and queued
    requests that belong to a kernel of this server name it (``kernel_id``, else null)."""
    kernels = set(kernels)
    for entry in status.get("slices", []):
        lease = entry.get("lease") or {}
        entry["kernel_id"] = kernel_of(lease.get("tag"), kernels) if entry.get("mine") else None
    for entry in status.get("queue", []):
        entry["kernel_id"] = kernel_of(entry.get("tag"), kernels) if entry.get("mine") else None
    return {**status, "seq": seq, "pseudonym": pseudonym, "admin": admin}


def kernel_lease_view(
    kernel_id: str, leases: list[dict[str, Any]], status: dict[str, Any]
) -> dict[str, Any]:
    """``GET kernels/<id>/lease`` from the kernel's tagged leases and the status. Only listed
    fields are copied: the lease key and the executor's address never reach a browser."""
    tag = KERNEL_TAG + kernel_id
    lease = leases[0] if leases else None
    public = None
    entry = None
    if lease is not None:
        public = {name: lease.get(name) for name in LEASE_FIELDS}
        public["slice"] = {name: lease["slice"].get(name) for name in SLICE_FIELDS}
        for candidate in status.get("slices", []):
            if (candidate.get("lease") or {}).get("id") == lease["id"]:
                entry = {**candidate, "kernel_id": kernel_id}
    queue = status.get("queue", [])
    waiting = next((q for q in queue if q.get("mine") and q.get("tag") == tag), None)
    state = "leased" if lease is not None else "queued" if waiting is not None else "none"
    return {
        "kernel_id": kernel_id,
        "state": state,
        "lease": public,
        "slice": entry,
        "queue": (
            {"position": waiting["position"], "queue_length": len(queue)} if waiting else None
        ),
    }


# -------------------------------------------------------------------------------- handlers
class MigApiHandler(APIHandler):
    auth_resource = "kernels"  # who may see and release kernels may see their slices

    @property
    def api(self) -> MigKernelApi:
        return self.settings[SETTINGS_KEY]

    async def broker(self, fn: Callable[[BrokerClient], T]) -> T:
        try:
            return await self.api.call(fn)
        except MigKernelError as exc:
            raise broker_error(exc) from exc

    def known_kernel(self, kernel_id: str) -> str:
        if kernel_id not in self.kernel_manager:
            raise ApiError(404, f"no kernel {kernel_id} on this server", "unknown_kernel")
        return kernel_id

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = (kwargs.get("exc_info") or (None, None, None))[1]
        if not isinstance(exc, ApiError):
            super().write_error(status_code, **kwargs)
            return
        self.set_header("Content-Type", "application/json")
        reply = {
            "message": exc.message,
            "reason": responses.get(status_code, "Unknown"),
            "code": exc.code,
        }
        self.log.warning("mig-kernel API: %s %s", status_code, exc.message)
        self.finish(json.dumps(reply))


def _query_number(
    handler: web.RequestHandler,
    name: str,
    kind: Callable[[str], float],
    low: float,
    high: float,
) -> float | None:
    """An optional numeric query argument in [low, high]; anything else is a 400 naming it."""
    raw = handler.get_query_argument(name, None)
    if raw is None:
        return None
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not low <= value <= high:
        bounds = f"from {low:g} to {high:g}" if math.isfinite(high) else f"of at least {low:g}"
        noun = "an integer" if kind is int else "a number"
        raise ApiError(400, f"{name} must be {noun} {bounds}, not {raw!r}", "bad_parameter")
    return value


class SlicesHandler(MigApiHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        after = _query_number(self, "after", int, 0, math.inf)
        timeout = _query_number(self, "timeout", float, 0, LONG_POLL_MAX)
        if timeout is None:
            timeout = LONG_POLL_DEFAULT
        feed = await self.api.feed()
        if after is not None:
            self._waiting = asyncio.ensure_future(feed.wait_change(int(after), timeout))
            try:
                await self._waiting
            except asyncio.CancelledError:
                if self._closed:
                    return  # the client went away: nobody to answer
                raise
        seq = feed.seq  # read before the status: the status is at least as new as this seq
        from .broker_link import status_and_seq

        status, seq = await self.broker(lambda c: status_and_seq(c, seq))
        kernels = self.kernel_manager.list_kernel_ids()
        pool = self.api.pool
        self.finish(json.dumps(node_view(status, seq, pool.pseudonym, kernels, pool.admin)))

    _waiting: asyncio.Future[bool] | None = None
    _closed = False

    def on_connection_close(self) -> None:
        """A long poll whose client left stops waiting (no status is fetched for nobody)."""
        self._closed = True
        if self._waiting is not None:
            self._waiting.cancel()


class KernelLeaseHandler(MigApiHandler):
    @web.authenticated
    @authorized
    async def get(self, kernel_id: str) -> None:
        self.known_kernel(kernel_id)
        tag = KERNEL_TAG + kernel_id
        leases, status = await self.broker(lambda c: (c.leases(tag=tag), c.status()))
        self.finish(json.dumps(kernel_lease_view(kernel_id, leases, status)))


class KernelReleaseHandler(MigApiHandler):
    @web.authenticated
    @authorized
    async def post(self, kernel_id: str) -> None:
        """Suspend the kernel's lease (``release`` with ``spill``): the slice goes back to the
        pool now, the device data waits on the host for the kernel's next GPU cell."""
        self.known_kernel(kernel_id)
        tag = KERNEL_TAG + kernel_id

        def release(client: BrokerClient) -> dict[str, Any] | None:
            held = client.leases(tag=tag)
            if not held:
                return None
            replies = [client.release(lease["id"], spill=True) for lease in held]
            return {"released": held[0]["id"], "spilled": replies[0].get("spilled") or {}}

        reply = await self.broker(release)
        if reply is None:
            raise ApiError(404, f"kernel {kernel_id} holds no GPU slice", "no_lease")
        self.finish(json.dumps(reply))


class LeaseReleaseHandler(MigApiHandler):
    @web.authenticated
    @authorized
    async def post(self, lease_id: str) -> None:
        """An admin ends any lease (its device data is dropped: the holder's next GPU cell
        leases anew and is told the data is lost). The broker decides who may: anyone else
        gets its refusal as a 403."""
        reply = await self.broker(lambda c: c.release(lease_id))
        self.finish(json.dumps(reply))
