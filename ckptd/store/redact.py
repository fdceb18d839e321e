"""Keep credentials out of logs: a filter on the boto loggers that redacts tokens and signatures.

botocore logs whole requests at DEBUG, session token and signature included;
a process that turns on DEBUG for everything would otherwise write them out.
"""

from __future__ import annotations

import logging
import re

_PATTERNS = [
    (re.compile(r"(X-Amz-Security-Token['\"]?\s*[:=]\s*b?['\"]?)[^'\"&\s,}]+", re.I), r"\1<redacted>"),
    (re.compile(r"(Signature=)[0-9a-f]+", re.I), r"\1<redacted>"),
    (re.compile(r"(X-Amz-Signature=)[0-9a-f]+", re.I), r"\1<redacted>"),
    (re.compile(r"(Credential=)[^/'\"\s,]+", re.I), r"\1<redacted>"),
    (
        re.compile(
            r"(aws_secret_access_key|aws_session_token|SecretAccessKey|SessionToken)(['\"]?\s*[:=]\s*['\"]?)"
            r"[^'\"&\s,}]+",
            re.I,
        ),
        r"\1\2<redacted>",
    ),
]
_LOGGERS = (
    "botocore",
    "botocore.endpoint",
    "botocore.auth",
    "botocore.hooks",
    "botocore.parsers",
    "botocore.credentials",
    "botocore.httpsession",
    "botocore.retryhandler",
    "boto3",
    "urllib3.connectionpool",
    "s3transfer",
)


def redact(text: str) -> str:
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


class RedactCredentials(logging.Filter):
    """Rewrites a record's message with tokens, signatures and key ids redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record that cannot format itself is left to logging's own handling
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


_installed = False


def install() -> None:
    """Attach the filter to the boto and urllib3 loggers once per process."""
    global _installed
    if _installed:
        return
    f = RedactCredentials()
    for name in _LOGGERS:
        logging.getLogger(name).addFilter(f)
    _installed = True
