"""Tenants at the gateway: whose a request is, and what keeps two tenants apart.

A tenant is the API key a request carries: its ``Authorization`` header, else its
``api-key`` header (Azure OpenAI's); the engine behind the gateway checks that key, so it
is the one identity the gateway can rely on. Requests without one are the anonymous
tenant. The gateway never keeps or logs the key itself: a tenant is named by a tag, a
keyed BLAKE2b of the key (``t`` and 16 hex digits) under a secret of the gateway's (random
per process unless given, so the tags and salts change when the gateway restarts).

Two tenants share nothing through the gateway:

- every id a request declares (conversation, app, parent conversations, SGLang step ids)
  is scoped to its tenant (``id@tag``), and what the gateway infers (history fingerprints,
  previous responses, data flow between conversations) is only ever matched within the
  tenant, so one tenant's requests never carry another's app, agent or hints;
- the request's ``cache_salt`` becomes ``tag:<the client's salt>`` (or ``tag``): vLLM keys
  its prefix cache by the salt, and TokenCake keys its host store and L2 by it, so one
  tenant's KV can never be served, or even hit, for another's request.

The anonymous tenant's ids are left as they are, and so is its salt when it sends none.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from typing import Any, Final

from tokencake.connectors.gateway.hints import Declared

TENANT_HEADERS: Final = ("Authorization", "api-key")
TAG_BYTES: Final = 8


class Tenants:
    """Names the tenant of a request; ``enabled=False`` makes every request anonymous."""

    def __init__(self, secret: bytes | None = None, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._secret = secret if secret else secrets.token_bytes(32)

    def of(self, headers: Mapping[str, str]) -> str:
        """The tenant's tag, or '' for the anonymous tenant."""
        if not self.enabled:
            return ""
        for name in TENANT_HEADERS:
            value = headers.get(name)
            if value:
                digest = hashlib.blake2b(
                    value.strip().encode("utf-8", "surrogateescape"),
                    key=self._secret[:64],
                    digest_size=TAG_BYTES,
                )
                return "t" + digest.hexdigest()
        return ""


def scope_declared(d: Declared, tenant: str) -> None:
    """Every id ``d`` declares, within ``tenant``'s namespace."""
    d.tenant = tenant
    if not tenant:
        return
    d.conversation = scoped(d.conversation, tenant)
    d.app_id = scoped(d.app_id, tenant)
    d.parents = tuple(scoped(c, tenant) for c in d.parents)
    d.step_id = scoped(d.step_id, tenant)
    d.parent_step = scoped(d.parent_step, tenant)


def scoped(ident: str, tenant: str) -> str:
    """``ident`` within ``tenant``'s namespace (unchanged for the anonymous tenant)."""
    return f"{ident}@{tenant}" if ident and tenant else ident


def salt(body: dict[str, Any], tenant: str) -> bool:
    """Scope the request's ``cache_salt`` to ``tenant``; True when ``body`` changed.

    An anonymous request without a salt keeps none; one with a salt gets ``anon:`` before
    it, so no request can name a tenant's salt by sending it.
    """
    own = body.get("cache_salt")
    own = own if isinstance(own, str) and own else ""
    if not tenant and not own:
        return False
    tag = tenant or "anon"
    body["cache_salt"] = f"{tag}:{own}" if own else tag
    return True
