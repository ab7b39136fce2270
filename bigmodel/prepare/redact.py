"""data.cleaning.redact: personal data and secrets replaced by a typed placeholder before tokenising.

Kinds (each a pattern, and a check where a pattern alone matches too much):
- email: local@domain.tld (a dotted domain with a letters-only top level: not user@localhost).
- phone: 7-15 digits with the usual separators and an optional +country code, written as a phone number
  is (a group structure, not a bare run of digits: a year or an id is not a phone).
- ip: IPv4 with every octet 0-255 (256.1.1.1 and version-like 1.2.3 are kept), and full IPv6.
- credit_card: 13-19 digits, optionally in groups of 4 separated by spaces or dashes, that pass the Luhn
  check (so an order number of the same length is kept).
- secret: common key shapes -- AWS access key ids (AKIA...), GitHub tokens (ghp_/gho_/ghs_...), Slack
  tokens (xox[abprs]-...), OpenAI-style keys (sk-...), Google API keys (AIza...), private key blocks.

A match becomes <EMAIL>, <PHONE>, <IP>, <CREDIT_CARD> or <SECRET>. prepare counts every kind (its report
and manifest: never silent) and keeps a few examples with the value masked (first and last character), so
`bigmodel inspect` can show what was taken out without putting it back.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

KINDS = ("email", "phone", "ip", "credit_card", "secret")
PLACEHOLDER = {kind: f"<{kind.upper()}>" for kind in KINDS}
EXAMPLES = 3  # per kind, masked, in the manifest
CONTEXT = 4096  # characters each side an example's context is redacted over (24 of them are shown)

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
PATTERNS: dict[str, re.Pattern[str]] = {
    "secret": re.compile(
        r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z]+ )?PRIVATE KEY-----"
        r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"
        r"|\bgh[pousr]_[A-Za-z0-9]{36,}\b"
        r"|\bxox[abprs]-[A-Za-z0-9-]{10,}\b"
        r"|\bsk-(?:proj-)?[A-Za-z0-9_-]{20,}\b"
        r"|\bAIza[0-9A-Za-z_-]{35}\b"
    ),
    "email": re.compile(r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b"),
    "credit_card": re.compile(r"(?<![\d-])(?:\d{4}[ -]){3}\d{1,7}(?![\d-])|(?<![\d-])\d{13,19}(?![\d-])"),
    "ip": re.compile(
        rf"(?<![\d.]){_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}(?![\d.])"
        r"|(?<![:\w])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![:\w])"
    ),
    "phone": re.compile(
        r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}(?![\w])"
    ),
}
ORDER = ("secret", "email", "credit_card", "ip", "phone")  # the most specific first: a card is not a phone


def redact_strings(value: Any, kinds: Collection[str], found: Redactions) -> Any:
    """Every string in a JSON-like record redacted (its keys kept): the texts of an sft record."""
    if isinstance(value, str):
        return found.redact(value, kinds)
    if isinstance(value, list):
        return [redact_strings(item, kinds, found) for item in value]
    if isinstance(value, dict):
        return {key: redact_strings(item, kinds, found) for key, item in value.items()}
    return value


def announce(found: Redactions, kinds: Collection[str]) -> None:
    """prepare's line: what was taken out, per kind asked for (zero counts too: never silent)."""
    from bigmodel import console

    console.info(
        "prepare: redacted "
        + ", ".join(f"{found.counts.get(kind, 0)} {kind}" for kind in kinds)
        + " (bigmodel inspect shows masked examples)"
    )


def luhn(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies (ISO/IEC 7812)."""
    total = 0
    for i, char in enumerate(reversed(digits)):
        value = int(char) * (2 if i % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def _card(match: str) -> bool:
    digits = re.sub(r"\D", "", match)
    return 13 <= len(digits) <= 19 and luhn(digits)


def _phone(match: str) -> bool:
    return 7 <= len(re.sub(r"\D", "", match)) <= 15


CHECKS: dict[str, Callable[[str], bool]] = {"credit_card": _card, "phone": _phone}


def mask(value: str) -> str:
    """A redacted value as an example may show it: its first and last character, its length."""
    return f"{value[0]}{'*' * max(len(value) - 2, 1)}{value[-1]}" if len(value) > 2 else "*" * len(value)


@dataclass
class Redactions:
    """What redaction took out: per kind, a count and a few masked examples in their context."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    keeps_examples: bool = True  # (False for an example's own context: no examples of examples)

    def redact(self, text: str, kinds: Collection[str]) -> str:
        for kind in ORDER:
            if kind in kinds:
                text = PATTERNS[kind].sub(lambda m, kind=kind: self._replace(m, kind), text)  # type: ignore[misc]
        return text

    def _replace(self, match: re.Match[str], kind: str) -> str:
        check = CHECKS.get(kind)
        if check is not None and not check(match.group(0)):
            return match.group(0)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        shown = self.examples.setdefault(kind, []) if self.keeps_examples else []
        if self.keeps_examples and len(shown) < EXAMPLES:
            text = match.string
            # the context redacted too (of every kind, uncounted; over a wider window than is shown, so a
            # value is not cut where the pattern would no longer see it): an example shows no other value
            context = Redactions(keeps_examples=False)
            before = context.redact(text[max(0, match.start() - CONTEXT) : match.start()], KINDS)[-24:]
            after = context.redact(text[match.end() : match.end() + CONTEXT], KINDS)[:24]
            shown.append(f"...{before}{PLACEHOLDER[kind]}{after}... ({mask(match.group(0))})".replace("\n", " "))
        return PLACEHOLDER[kind]
