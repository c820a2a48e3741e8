"""Who is asking: the identity behind a client session.

A client opens a session with ``hello``; the identity provider decides which key that hello must
be signed with and who the caller is. Every later request is signed with the per-client key the
broker issued in reply, so the provider is consulted once per session. Single-user installs use
``LocalUserIdentity`` (whoever can read the 0600 connection file is the broker's OS user); a
JupyterHub provider verifies the hub API token carried in the hello instead, with no change to
the rest of the broker.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from traitlets import Set, Unicode
from traitlets.config import LoggingConfigurable

from ..wire.errors import AuthenticationError


@dataclass(frozen=True)
class Identity:
    user: str
    admin: bool


class IdentityProvider(LoggingConfigurable):
    """Base: subclasses name the hello key and turn a hello body into an Identity."""

    admin_users = Set(
        Unicode(),
        help="Users allowed to drain slices and apply layouts (default: the broker's OS user).",
    ).tag(config=True)

    def hello_key(self, connection_key: bytes) -> bytes:
        """The key a hello must be signed with."""
        raise NotImplementedError("IdentityProvider subclasses choose the hello key")

    def identify(self, hello: dict[str, Any]) -> Identity:
        """The identity of a caller whose hello verified; raise AuthenticationError to refuse."""
        raise NotImplementedError("IdentityProvider subclasses identify callers")


class LocalUserIdentity(IdentityProvider):
    """Single-user: the caller read the 0600 connection file, so it is the broker's OS user."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.user = getpass.getuser()
        if not self.admin_users:
            self.admin_users = {self.user}

    def hello_key(self, connection_key: bytes) -> bytes:
        return connection_key

    def identify(self, hello: dict[str, Any]) -> Identity:
        claimed = hello.get("user")
        if claimed not in (None, self.user):
            raise AuthenticationError(
                f"this broker serves user {self.user!r} only; {claimed!r} cannot sign in here"
            )
        return Identity(self.user, self.user in self.admin_users)


def pseudonym(secret: bytes, user: str) -> str:
    """A stable stand-in for a user name, shown to other users instead of the name."""
    return "user-" + hmac.new(secret, user.encode(), hashlib.sha256).hexdigest()[:6]
