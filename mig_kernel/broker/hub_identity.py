"""Identities of JupyterHub users, for a multi-user broker on a hub's GPU node.

Two kinds of deployment meet here:
- hub users that are OS users (LocalProcessSpawner, SystemdSpawner, batchspawner): the kernel's
  socket credentials already name the user; nothing more is needed (PeerCredentialIdentity).
- hub users that share one OS user (SimpleLocalProcessSpawner; DockerSpawner and KubeSpawner,
  where everyone is ``jovyan``): the uid says nothing about who it is. For connections from the
  uids listed in ``shared_uids`` the hello must carry the single-user server's API token
  (``JUPYTERHUB_API_TOKEN``, which the hub gives the server and the server its kernels); the
  broker asks the hub whose token it is (``GET <hub_api_url>/user`` with that token), caches the
  answer for ``cache_seconds``, and refuses tokens the hub does not know (expired, revoked,
  forged) with a clear error. Such users are named ``hub:<name>``, so a hub user can never pass
  for an OS user of the same name. Their executors become an unprivileged uid of their own from
  ``executor_uids`` (never root, never the broker's or the shared uid), with a private HOME.

Tokens are never logged or stored; the cache holds their SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

from traitlets import Float, Int, Set, Tuple, Unicode, default

from ..wire.errors import AuthenticationError
from ..wire.executor_spec import Account
from ..wire.paths import secure_dir
from ..wire.peercred import PeerCredentials
from .identity import Identity, PeerCredentialIdentity

HUB_PREFIX = "hub:"


class JupyterHubIdentity(PeerCredentialIdentity):
    hub_api_url = Unicode(
        help="The hub's REST API, e.g. http://127.0.0.1:8081/hub/api. Default: "
        "$JUPYTERHUB_API_URL (set when the hub starts the broker as a managed service)."
    ).tag(config=True)
    api_token = Unicode(
        help="The broker's own service token (c.JupyterHub.services), used to read a user's "
        "admin flag and groups where the user's token may not (scopes read:users:name, "
        "read:users:groups). Default: $JUPYTERHUB_API_TOKEN. Never logged."
    ).tag(config=True)
    shared_uids = Set(
        Int(),
        help="OS uids whose processes belong to several hub users (the single OS user of "
        "SimpleLocalProcessSpawner, DockerSpawner or KubeSpawner): their hellos must carry a "
        "hub token. Connections from other uids are identified by their uid alone.",
    ).tag(config=True)
    executor_uids = Tuple(
        Int(),
        Int(),
        default_value=(61000, 61999),
        help="The range of unprivileged uids (first, last; no /etc/passwd entry needed) from "
        "which each token-identified hub user's executors get a uid of their own.",
    ).tag(config=True)
    homes_dir = Unicode(
        "/var/lib/mig-kernel-homes",
        help="Where token-identified hub users' executors get a private HOME (0700 each).",
    ).tag(config=True)
    cache_seconds = Float(
        30.0, help="Seconds a verified token's identity is reused before the hub is asked again."
    ).tag(config=True)
    timeout = Float(3.0, help="Seconds to wait for the hub's answer.").tag(config=True)

    @default("hub_api_url")
    def _default_hub_api_url(self) -> str:
        return os.environ.get("JUPYTERHUB_API_URL", "http://127.0.0.1:8081/hub/api")

    @default("api_token")
    def _default_api_token(self) -> str:
        return os.environ.get("JUPYTERHUB_API_TOKEN", "")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._cache: dict[str, tuple[float, Identity]] = {}

    def identify(self, hello: dict[str, Any], peer: PeerCredentials | None) -> Identity:
        if peer is None or peer.uid not in self.shared_uids:
            return super().identify(hello, peer)
        token = hello.get("hub_token")
        if not isinstance(token, str) or not token:
            raise AuthenticationError(
                "this GPU node identifies JupyterHub users by their server's API token, and this "
                "connection sent none: start the kernel from your JupyterHub server (it sets "
                "JUPYTERHUB_API_TOKEN)"
            )
        return self._verified(token, peer.uid)

    def is_slow(self, hello: dict[str, Any], peer: PeerCredentials | None) -> bool:
        """A token the cache does not vouch for must be confirmed by the hub."""
        token = hello.get("hub_token")
        if peer is None or peer.uid not in self.shared_uids or not isinstance(token, str):
            return False
        return self._cached(token) is None

    def _cached(self, token: str) -> Identity | None:
        """The identity the hub confirmed for ``token`` less than ``cache_seconds`` ago."""
        entry = self._cache.get(hashlib.sha256(token.encode()).hexdigest())
        return entry[1] if entry is not None and entry[0] > time.monotonic() else None

    def _verified(self, token: str, uid: int) -> Identity:
        cached = self._cached(token)
        if cached is not None:
            return cached
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        model = self._hub("/user", token)
        if model.get("kind", "user") != "user" or not isinstance(model.get("name"), str):
            raise AuthenticationError("this token belongs to a hub service, not to a user")
        if "admin" not in model or "groups" not in model:  # the user's token may not read them
            model = {**model, **self._lookup(model["name"])}
        groups = tuple(sorted(str(g) for g in model.get("groups") or ()))
        who = Identity(
            HUB_PREFIX + model["name"], admin=bool(model.get("admin")), uid=uid, groups=groups
        )
        if len(self._cache) > 10000:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        self._cache[digest] = (now + self.cache_seconds, who)
        return who

    def _lookup(self, name: str) -> dict[str, Any]:
        if not self.api_token:
            return {}
        try:
            return self._hub(f"/users/{urllib.request.quote(name)}", self.api_token)
        except AuthenticationError as exc:
            self.log.warning("could not read hub user %r with the broker's token: %s", name, exc)
            return {}

    def _hub(self, path: str, token: str) -> dict[str, Any]:
        request = urllib.request.Request(
            self.hub_api_url.rstrip("/") + path, headers={"Authorization": f"token {token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403, 404):
                raise AuthenticationError(
                    "JupyterHub does not accept this token (expired, revoked or not a hub "
                    "token): restart your server from the hub's control panel"
                ) from None
            raise AuthenticationError(
                f"JupyterHub answered {exc.code} to the token check"
            ) from None
        except (OSError, ValueError) as exc:
            raise AuthenticationError(
                f"cannot check your JupyterHub token: the hub at {self.hub_api_url} did not "
                f"answer ({exc}); try again, or ask your administrator"
            ) from None

    def executor_account(self, user: str, uid: int) -> Account:
        if not user.startswith(HUB_PREFIX) or uid not in self.shared_uids:
            return super().executor_account(user, uid)
        first, last = self.executor_uids
        if not 0 < first <= last:
            raise AuthenticationError(f"executor_uids {self.executor_uids} is not a uid range")
        homes = secure_dir(Path(self.homes_dir), 0o711)
        own = self._uid_of(user, homes, first, last)
        home = secure_dir(homes / f"uid-{own}", 0o700, uid=own, gid=own)
        return Account(user, own, own, (own,), str(home))

    @staticmethod
    def _uid_of(user: str, homes: Path, first: int, last: int) -> int:
        """The uid of ``user``'s executors: stable (a restarted broker gives the same one) and
        never another user's. It starts at a hash of the name and takes the first uid whose
        marker (``uid-N.owner``, root's, beside the homes) is free or names this user."""
        size = last - first + 1
        start = zlib.crc32(user.encode()) % size
        for step in range(size):
            uid = first + (start + step) % size
            marker = homes / f"uid-{uid}.owner"
            try:
                fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            except FileExistsError:
                if marker.read_text() == user:
                    return uid
                continue
            with os.fdopen(fd, "w") as f:
                f.write(user)
            return uid
        raise AuthenticationError(f"no free executor uid left in {first}-{last}")
