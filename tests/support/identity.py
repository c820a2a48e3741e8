"""An identity provider for tests only: it believes the user name a hello claims.

Real installs never use this; it lets one test process play several users against one real
broker so anonymization, quotas and permissions can be checked.
"""

from __future__ import annotations

from typing import Any

from mig_kernel.broker.identity import Identity, IdentityProvider
from mig_kernel.wire.peercred import PeerCredentials


class ClaimedUserIdentity(IdentityProvider):
    """Users named "admin" are admins: tests/conftest.py passes ``LeasePolicy.admin_users``."""

    def hello_key(self, connection_key: bytes) -> bytes:
        return connection_key

    def identify(self, hello: dict[str, Any], peer: PeerCredentials | None) -> Identity:
        user = str(hello.get("user") or "nobody")
        return Identity(user)  # a claim vouches for no uid (so root's claims are not root's)
