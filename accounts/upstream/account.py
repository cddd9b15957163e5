"""What a serving process knows of one upstream account: :class:`AccountInfo`.

Built by the data plane's config snapshot (gateway/config/snapshot.py) from
``accounts.selectors.accounts_for_snapshot``, and read by the supply side's runtime code:
selection (accounts/routing/selection.py), probing (accounts/health/probing.py) and the
upstream call itself. The snapshot passes every field; the defaults serve tests and tools.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class AccountInfo:
    account_id: int
    pool_id: int = 0
    pool_name: str = ""
    responses_url: str = ""  # the account's base URL + "/responses"
    credential: str | None = None  # decrypted; never printed (see __repr__)
    models: frozenset[str] = field(default_factory=frozenset)
    weight: int = 1
    strip_fields: frozenset[str] = field(default_factory=frozenset)
    max_concurrency: int | None = None
    priority: int = 0

    def __repr__(self) -> str:  # never print the credential
        return f"AccountInfo(id={self.account_id}, pool={self.pool_name!r}, url={self.responses_url!r})"
