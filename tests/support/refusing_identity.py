"""An identity provider for tests only: it refuses every caller, as a broker's policy refuses a
user it does not serve. It lets a test see a real refusal travel from a real broker to a
kernel start, ``%gpu status`` and ``mig-kernel status``."""

from __future__ import annotations

from typing import Any

from mig_kernel.broker.identity import Identity, LocalUserIdentity
from mig_kernel.wire.errors import NotPermitted

REFUSAL = "not allowed by policy: this node serves the group gpu-users only"


class PolicyRefusedIdentity(LocalUserIdentity):
    def identify(self, hello: dict[str, Any], *args: Any, **kwargs: Any) -> Identity:
        """Refuse whatever the hello and the connection say (``*args``: what newer brokers
        pass besides the hello, such as the peer's credentials)."""
        raise NotPermitted(REFUSAL)
