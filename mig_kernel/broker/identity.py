"""Who is asking: the identity behind a client session.

A client opens a session with ``hello``; the identity provider decides which key that hello must
be signed with and who the caller is, from the peer credentials the kernel reports for the
connection (``wire/peercred.py``) and, for providers that need one, a proof carried in the hello
(a JupyterHub token). A claim in the hello never overrides the kernel's word. Every later
request is signed with the per-client key the broker issued in reply and must come from the
same uid, so the provider is consulted once per session. What an identity may do (admin, quota,
profiles) is the lease policy's decision (``policy.py``), not the provider's.

- ``LocalUserIdentity`` (single-user, the default): whoever can read the 0600 connection file
  and connects as the broker's own uid (or root) is the broker's OS user.
- ``PeerCredentialIdentity`` (``--multi-user``): the connection file is public; the user is the
  OS user of the connecting uid.
"""

from __future__ import annotations

import grp
import hashlib
import hmac
import os
import pwd
from dataclasses import dataclass, field
from typing import Any

from traitlets.config import LoggingConfigurable

from ..wire.errors import AuthenticationError
from ..wire.executor_spec import Account
from ..wire.peercred import PeerCredentials, user_name


@dataclass(frozen=True)
class Identity:
    user: str
    admin: bool = False  # decided by the lease policy once the provider has named the user
    uid: int | None = None  # the OS uid the session's connections must come from
    groups: tuple[str, ...] = field(default=())


def account_of(uid: int) -> Account:
    """The OS account of ``uid`` (KeyError if the node does not know it)."""
    entry = pwd.getpwuid(uid)
    gids = tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid))))
    return Account(entry.pw_name, uid, entry.pw_gid, gids, entry.pw_dir)


def group_names(user: str) -> tuple[str, ...]:
    """The names of the groups of OS user ``user`` (primary and supplementary; none if the
    node does not know the user)."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return ()
    names = []
    for gid in os.getgrouplist(user, entry.pw_gid):
        try:
            names.append(grp.getgrgid(gid).gr_name)
        except KeyError:
            names.append(str(gid))
    return tuple(sorted(set(names)))


class IdentityProvider(LoggingConfigurable):
    """Base: subclasses name the hello key and turn a hello into an Identity."""

    def hello_key(self, connection_key: bytes) -> bytes:
        """The key a hello must be signed with."""
        raise NotImplementedError("IdentityProvider subclasses choose the hello key")

    def identify(self, hello: dict[str, Any], peer: PeerCredentials | None) -> Identity:
        """The identity of a caller whose hello verified, connected with ``peer`` credentials
        (None where the transport has none); raise AuthenticationError to refuse."""
        raise NotImplementedError("IdentityProvider subclasses identify callers")

    @property
    def user(self) -> str:
        """The user the broker's files and connection file speak for ("" if several)."""
        return ""

    def is_slow(self, hello: dict[str, Any], peer: PeerCredentials | None) -> bool:
        """Whether ``identify`` would wait for another service (then the broker calls it on a
        worker thread, and it must be thread-safe); local checks are not."""
        return False

    def executor_account(self, user: str, uid: int) -> Account:
        """The OS account a multi-user broker's executor becomes for ``user``, who connected
        as ``uid``: by default that uid's own account."""
        return account_of(uid)


class LocalUserIdentity(IdentityProvider):
    """Single-user: the caller read the 0600 connection file and connects as the broker's own
    uid (root may too: it can read every file anyway), so it is the broker's OS user."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.uid = os.geteuid()
        self._user = user_name(self.uid)

    @property
    def user(self) -> str:
        return self._user

    def hello_key(self, connection_key: bytes) -> bytes:
        return connection_key

    def identify(self, hello: dict[str, Any], peer: PeerCredentials | None) -> Identity:
        if peer is not None and peer.uid not in (self.uid, 0):
            raise AuthenticationError(
                f"this broker serves user {self._user!r} only, and you are "
                f"{user_name(peer.uid)!r}: use your own broker (`mig-kernel broker`) or the "
                f"node's multi-user one"
            )
        claimed = hello.get("user")
        if claimed not in (None, self._user):
            raise AuthenticationError(
                f"this broker serves user {self._user!r} only; {claimed!r} cannot sign in here"
            )
        return Identity(self._user, uid=peer.uid if peer else None)


class PeerCredentialIdentity(IdentityProvider):
    """Multi-user: the user is the OS user of the uid that connected (SO_PEERCRED). The
    connection file holds no secret, so the hello is signed with an empty key: the proof is
    the kernel's word on the socket, which no message can change."""

    def hello_key(self, connection_key: bytes) -> bytes:
        return b""

    def identify(self, hello: dict[str, Any], peer: PeerCredentials | None) -> Identity:
        if peer is None:
            raise AuthenticationError(
                "this broker identifies users by their socket's credentials, and this "
                "connection has none (only local ipc connections can sign in)"
            )
        try:
            entry = pwd.getpwuid(peer.uid)
        except KeyError:
            raise AuthenticationError(
                f"uid {peer.uid} has no user name on this node, so no slice can be leased for it"
            ) from None
        return Identity(entry.pw_name, uid=peer.uid, groups=group_names(entry.pw_name))


def pseudonym(secret: bytes, user: str) -> str:
    """A stable stand-in for a user name, shown to other users instead of the name."""
    return "user-" + hmac.new(secret, user.encode(), hashlib.sha256).hexdigest()[:6]
