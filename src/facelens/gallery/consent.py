"""The consent record every enrollment needs: who, for what, on which legal basis, since when.

Processing biometric data to identify a person is prohibited by GDPR Art. 9(1) unless one of the
exceptions of Art. 9(2) applies. The gallery therefore refuses an enrollment without a record naming
the subject, the purpose, the legal basis (one of :data:`LEGAL_BASES`) and the time it was given.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from ..errors import FaceLensError

__all__ = ["LEGAL_BASES", "Consent", "ConsentError", "parse_time", "utc_now"]

# code -> the Art. 9(2) exception it stands for
LEGAL_BASES: dict[str, str] = {
    "explicit-consent": "Art. 9(2)(a): explicit consent of the data subject",
    "employment": "Art. 9(2)(b): obligations in employment and social security law",
    "vital-interests": "Art. 9(2)(c): vital interests, subject incapable of consent",
    "made-public": "Art. 9(2)(e): data manifestly made public by the data subject",
    "legal-claims": "Art. 9(2)(f): establishment, exercise or defence of legal claims",
    "public-interest": "Art. 9(2)(g): substantial public interest on a legal basis",
    "research": "Art. 9(2)(j): scientific research or statistics, with safeguards (Art. 89)",
}


class ConsentError(FaceLensError):
    """A consent record is missing or incomplete."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def parse_time(value: str | datetime) -> datetime:
    """An aware UTC datetime from ISO 8601 text or a datetime (naive ones are taken as UTC)."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ConsentError(f"not an ISO 8601 time: {value!r}") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


@dataclass(frozen=True)
class Consent:
    """Who agreed (or on which other Art. 9(2) basis they are enrolled), for what purpose, and when."""

    subject: str
    purpose: str
    legal_basis: str
    given_at: datetime

    def __post_init__(self) -> None:
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise ConsentError("consent record: the subject is empty")
        if not isinstance(self.purpose, str) or not self.purpose.strip():
            raise ConsentError(f"consent record for {self.subject!r}: the purpose is empty")
        if self.legal_basis not in LEGAL_BASES:
            raise ConsentError(f"consent record for {self.subject!r}: legal basis {self.legal_basis!r} is not one of "
                               f"{', '.join(LEGAL_BASES)} (GDPR Art. 9(2))")
        object.__setattr__(self, "given_at", parse_time(self.given_at))
        if self.given_at > utc_now():
            raise ConsentError(f"consent record for {self.subject!r}: given in the future "
                               f"({self.given_at.isoformat()})")

    @classmethod
    def now(cls, subject: str, purpose: str, legal_basis: str) -> Consent:
        return cls(subject, purpose, legal_basis, utc_now())

    def as_json(self) -> dict[str, str]:
        return {"subject": self.subject, "purpose": self.purpose, "legal_basis": self.legal_basis,
                "legal_basis_text": LEGAL_BASES[self.legal_basis], "given_at": self.given_at.isoformat()}
