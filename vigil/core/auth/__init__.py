"""Identities and who may do what: tokens (stored hashed), the principal a call acts
for, the authenticator every replica runs, the one table of RPC rules, and TLS."""

from vigil.core.auth.authenticator import Authenticator
from vigil.core.auth.principal import SYSTEM, Principal, TokenRecord
from vigil.core.auth.rules import RULES, Rule, Scope, permit
from vigil.core.auth.store import AuthStore

__all__ = [
    "RULES",
    "SYSTEM",
    "AuthStore",
    "Authenticator",
    "Principal",
    "Rule",
    "Scope",
    "TokenRecord",
    "permit",
]
