"""PII redaction (BigCode practice): emails, public IPv4/IPv6 addresses, secrets and keys.

Detection: emails by regex (common TLDs only, so `h@self.weight` stays code); IPs by regex then
`ipaddress` validation, keeping private/reserved ranges, well-known DNS servers and version-like
dotted numbers (`v1.2.3.4`, `==1.2.3.4`, all single-digit parts, part of a longer dotted run);
secrets with detect-secrets' plugins (AWS, GitHub, Slack, Stripe, JWT, keyword `password = "..."`,
high-entropy strings, ...) plus private-key blocks, skipping hex strings of hash lengths (md5,
sha1/git, sha256, ...), hex that only an entropy plugin flagged (split digests, test vectors),
UUIDs and other detect-secrets heuristics. A cheap pre-filter sends only
lines that could hold a secret to detect-secrets, which is what keeps this stage fast.

Placeholders are consistent: a keyed hash (salt in `PiiConfig`) of the value picks the
replacement, so the same value gets the same placeholder in every file, on every worker, in any
order: emails -> `user_<h>@example.com`, IPv4 -> a TEST-NET address (RFC 5737), IPv6 -> an
address in 2001:db8::/32 (RFC 3849), secrets -> `<KEY_<h>>`. Placeholders are themselves
never detected, so redaction is idempotent.

    redactor = PiiRedactor(); text, counts = redactor.redact(source_text)
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import string
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from codegemma.data.base import PipelineStep
from codegemma.data.document import Document

COMMON_TLDS = frozenset(
    {
        "com",
        "org",
        "net",
        "edu",
        "gov",
        "mil",
        "int",
        "io",
        "co",
        "ai",
        "dev",
        "app",
        "info",
        "biz",
        "me",
        "us",
        "uk",
        "de",
        "fr",
        "jp",
        "cn",
        "ru",
        "in",
        "br",
        "it",
        "nl",
        "es",
        "ca",
        "au",
        "ch",
        "se",
        "no",
        "fi",
        "dk",
        "pl",
        "cz",
        "at",
        "be",
        "kr",
        "tw",
        "il",
        "ie",
        "nz",
        "za",
        "mx",
        "ar",
        "eu",
        "xyz",
        "tech",
        "cloud",
        "email",
        "online",
        "site",
        "ly",
        "gg",
        "sh",
        "to",
        "cc",
        "tv",
        "fm",
        "ws",
        "pt",
        "gr",
        "hu",
        "ro",
        "ua",
        "sk",
        "si",
        "hr",
        "bg",
        "lt",
        "lv",
        "ee",
        "is",
        "lu",
        "sg",
        "hk",
        "my",
        "th",
        "vn",
        "id",
        "ph",
        "pk",
        "tr",
        "ir",
        "sa",
        "ae",
        "eg",
        "ng",
        "ke",
        "cl",
        "pe",
        "ve",
        "ec",
        "uy",
    }
)
_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@((?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+"
    r"([A-Za-z]{2,}))(?![\w-])"
)
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_PRIVATE_KEY = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?)-----.*?-----END \1-----", re.DOTALL
)
# A line can hold a secret only if it has a long token with a digit (random keys of 16+ chars
# virtually always have one; identifiers rarely do), URL credentials, or a secret-ish keyword
# being assigned. Anchors with literal prefixes keep the scan at C speed.
_LONG_TOKEN = re.compile(r"[A-Za-z0-9+/=_-]{16,}")
_DIGIT = re.compile(r"\d")
_URL_CREDENTIALS = re.compile(r"://[^/\s:@]+:[^/\s@]+@")
SECRET_KEYWORDS = ("pass", "pwd", "secret", "token", "key", "auth", "cred")
_KEYWORD_ASSIGN = re.compile(
    r"(?i)(?:pass|pwd|secret|token|key|auth|cred)[\w-]*['\"]?\s*(?:[:=]|=>)"
)
_IPV4_ANCHOR = re.compile(r"\.\d{1,3}\.\d{1,3}\.")
_IPV6_ANCHOR = re.compile(r":[0-9A-Fa-f]{0,4}:")
_HEX = re.compile(r"[0-9a-fA-F]+")
HASH_HEX_LENGTHS = frozenset(
    {32, 40, 56, 64, 96, 128}
)  # md5, sha1/git, sha224, sha256, sha384, sha512
PUBLIC_DNS = frozenset(
    {
        "8.8.8.8",
        "8.8.4.4",
        "1.1.1.1",
        "1.0.0.1",
        "9.9.9.9",
        "149.112.112.112",
        "208.67.222.222",
        "208.67.220.220",
        "4.2.2.2",
        "4.2.2.1",
        "64.6.64.6",
        "64.6.65.6",
        "2001:4860:4860::8888",
        "2001:4860:4860::8844",
        "2606:4700:4700::1111",
        "2606:4700:4700::1001",
        "2620:fe::fe",
    }
)
_VERSION_BEFORE = re.compile(
    r"(?i)(?:\b(?:version|ver|release|rel|v)|==|>=|<=|~=|!=|\^|~|@)\s*['\"]?$"
)
_TEST_NETS = ("192.0.2", "198.51.100", "203.0.113")


@dataclass(frozen=True, kw_only=True)
class PiiConfig:
    emails: bool = True
    ips: bool = True
    secrets: bool = True
    salt: str = "codegemma-pii"  # set your own to make placeholders unlinkable to values


class PiiRedactor:
    """Finds PII spans in a text and replaces them with consistent placeholders."""

    def __init__(self, config: PiiConfig | None = None) -> None:
        self.config = config or PiiConfig()
        self._key = hashlib.blake2b(self.config.salt.encode()).digest()[:32]
        self._plugins = _secret_plugins() if self.config.secrets else []

    def _h(self, value: str) -> bytes:
        return hashlib.blake2b(
            value.encode("utf-8", "surrogatepass"), key=self._key, digest_size=8
        ).digest()

    def placeholder(self, kind: str, value: str) -> str:
        h = self._h(f"{kind}\0{value}")
        if kind == "email":
            return f"user_{h[:4].hex()}@example.com"
        if kind == "ipv4":
            return f"{_TEST_NETS[h[0] % 3]}.{1 + h[1] % 254}"
        if kind == "ipv6":
            return f"2001:db8::{h[0]:02x}{h[1]:02x}:{h[2]:02x}{h[3]:02x}"
        return f"<KEY_{h[:4].hex()}>"

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """Non-overlapping (start, end, kind) spans, earliest first (longest wins a tie)."""
        spans: list[tuple[int, int, str]] = []
        if self.config.secrets:
            spans += self._secrets(text)
        if self.config.emails:
            ats = (m.start() for m in re.finditer("@", text))
            spans += [
                (m.start(), m.end(), "email")
                for m in _near(_EMAIL, text, ats, 64, 256)
                if _is_real_email(m)
            ]
        if self.config.ips:
            dots = (m.start() for m in _IPV4_ANCHOR.finditer(text))
            spans += [
                (m.start(), m.end(), "ipv4")
                for m in _near(_IPV4, text, dots, 4, 16)
                if _is_public_ipv4(m.group(), text, m.start())
            ]
            colons = (m.start() for m in _IPV6_ANCHOR.finditer(text))
            spans += [
                (m.start(), m.end(), "ipv6")
                for m in _near(_IPV6, text, colons, 40, 44)
                if _is_public_ipv6(m.group())
            ]
        spans.sort(key=lambda s: (s[0], -(s[1] - s[0])))
        out: list[tuple[int, int, str]] = []
        for span in spans:
            if not out or span[0] >= out[-1][1]:
                out.append(span)
        return out

    def redact(self, text: str) -> tuple[str, Counter[str]]:
        counts: Counter[str] = Counter()
        spans = self.find(text)
        if not spans:
            return text, counts
        parts, pos = [], 0
        for start, end, kind in spans:
            parts += [text[pos:start], self.placeholder(kind.split(".")[0], text[start:end])]
            counts[kind.split(".")[0]] += 1
            pos = end
        parts.append(text[pos:])
        return "".join(parts), counts

    def _secrets(self, text: str) -> list[tuple[int, int, str]]:
        spans = []
        for m in _PRIVATE_KEY.finditer(text):
            spans.append((m.start(), m.end(), "secret"))
        for start in _candidate_lines(text):
            end = text.find("\n", start)
            line = text[start : end if end >= 0 else len(text)]
            if len(line) > 4000:  # data, not code; the quality filters drop such files anyway
                continue
            spans += [(start + a, start + b, "secret") for a, b in self._line_secrets(line)]
        return spans

    def _line_secrets(self, line: str) -> set[tuple[int, int]]:
        """Spans of secrets in one line, each widened to its whole token."""
        from detect_secrets.filters import heuristic as h

        found = set()
        for plugin in self._plugins:
            for s in plugin.analyze_line(filename="code", line=line, line_number=0):
                if not s.secret_value or "Private Key" in s.type:  # key blocks: redacted whole
                    continue
                for m in re.finditer(re.escape(s.secret_value), line):
                    a, b = _widen(line, m.start(), m.end())
                    value = line[a:b]
                    if (
                        len(value) < 6
                        or _looks_like_hash(value, s.type)
                        or _is_sequential(value)
                        or h.is_potential_uuid(value)
                        or h.is_templated_secret(value)
                        or h.is_prefixed_with_dollar_sign(value)
                        or h.is_likely_id_string(value, line, plugin)
                    ):
                        continue
                    found.add((a, b))
        return found


def _near(
    pattern: re.Pattern[str], text: str, anchors: Iterable[int], before: int, after: int
) -> list[re.Match[str]]:
    """Matches of `pattern` in windows around cheap anchor hits, each span once."""
    seen, out = set(), []
    for a in anchors:
        for m in pattern.finditer(text, max(0, a - before), a + after):
            if m.start() <= a < m.end() + 1 and m.span() not in seen:
                seen.add(m.span())
                out.append(m)
    return out


_KEY_CHARS = frozenset(string.ascii_letters + string.digits + "+/_-.~")


def _widen(line: str, a: int, b: int) -> tuple[int, int]:
    """Some detectors report only a key's prefix (GitHub's `ghp`): take the whole token.
    `=` only extends to the right (base64 padding), so `key=VALUE` keeps its `key=`."""
    while a > 0 and line[a - 1] in _KEY_CHARS:
        a -= 1
    while b < len(line) and (line[b] in _KEY_CHARS or line[b] == "="):
        b += 1
    return a, b


def _candidate_lines(text: str) -> list[int]:
    """Start offsets of the lines that could hold a secret."""
    hits = [m.start() for m in _LONG_TOKEN.finditer(text) if _DIGIT.search(m.group())]
    hits += [m.start() for m in _URL_CREDENTIALS.finditer(text)]
    low = text.lower()
    for kw in SECRET_KEYWORDS:
        i = low.find(kw)
        while i >= 0:
            start = text.rfind("\n", 0, i) + 1
            end = text.find("\n", i)
            if _KEYWORD_ASSIGN.search(text, start, end if end >= 0 else len(text)):
                hits.append(i)
            i = low.find(kw, end if end >= 0 else len(text))
    return sorted({text.rfind("\n", 0, h) + 1 for h in hits})


def _secret_plugins() -> list:
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    skip = {"Public IP (ipv4)"}  # IPs are handled here, with version/private/DNS exceptions
    return [
        cls()
        for name, cls in sorted(get_mapping_from_secret_type_to_class().items())
        if name not in skip
    ]


def _is_sequential(value: str) -> bool:
    """Alphabets and digit runs ("ABCDEFGH...234567") are tables, not keys."""
    steps = sum(ord(b) - ord(a) == 1 for a, b in zip(value, value[1:], strict=False))
    return steps >= 0.5 * (len(value) - 1)


def _looks_like_hash(value: str, secret_type: str) -> bool:
    """Hex of a hash length is a digest; any hex that only an entropy plugin flagged (no key
    format, no `password =` context) is a digest, a test vector or an id, not a credential."""
    if _HEX.fullmatch(value) is None:
        return False
    return len(value) in HASH_HEX_LENGTHS or "High Entropy" in secret_type


def _is_real_email(m: re.Match[str]) -> bool:
    domain, tld = m.group(1).lower(), m.group(2).lower()
    if tld not in COMMON_TLDS:
        return False
    return not re.search(r"(?:^|\.)example\.(?:com|org|net)$", domain)  # reserved (RFC 2606)


def _is_public_ipv4(value: str, text: str, start: int) -> bool:
    try:
        ip = ipaddress.IPv4Address(value)
    except ValueError:
        return False
    if not ip.is_global or value in PUBLIC_DNS:
        return False
    if ip.is_multicast or sum(len(p) == 1 for p in value.split(".")) >= 3:
        return False  # 1.2.3.4, 7.1.4.34: versions and section numbers, not hosts
    return not _VERSION_BEFORE.search(text[max(0, start - 12) : start])


def _is_public_ipv6(value: str) -> bool:
    groups = [g for g in value.split(":") if g]
    # `1::2` slices, `a::b` scopes: demand 8 groups, or "::" with at least 3 groups
    if len(groups) < 3 or ("::" not in value and len(groups) != 8):
        return False
    try:
        ip = ipaddress.IPv6Address(value)
    except ValueError:
        return False
    return ip.is_global and str(ip) not in PUBLIC_DNS and value.lower() not in PUBLIC_DNS


class PiiStep(PipelineStep):
    """Redacts each document; counts by kind and the number of documents touched."""

    name = "pii"

    def __init__(self, config: PiiConfig | None = None) -> None:
        super().__init__()
        self.redactor = PiiRedactor(config)

    def run(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            text, counts = self.redactor.redact(doc.text)
            if counts:
                self.stats.update(counts)
                self.stats["documents_redacted"] += 1
                doc.text = text
            yield doc
