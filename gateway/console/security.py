"""Sign-in throttling and CSRF token checks for the console."""

from __future__ import annotations

import hmac
import time
from collections import deque


class LoginLimiter:
    """At most `attempts` failed sign-ins per `window_s`, per username and per client address.

    Kept in the process (each worker counts its own); a success clears the username's count.
    """

    def __init__(self, attempts: int, window_s: float) -> None:
        self.attempts = attempts
        self.window_s = window_s
        self._failures: dict[str, deque[float]] = {}

    def _live(self, key: str, now: float) -> deque[float]:
        failures = self._failures.setdefault(key, deque())
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        return failures

    def retry_after(self, username: str, address: str) -> int:
        """Seconds until another attempt is allowed (0: allowed now)."""
        now = time.monotonic()
        wait = 0.0
        for key in (f"u:{username.lower()}", f"a:{address}"):
            failures = self._live(key, now)
            if len(failures) >= self.attempts:
                wait = max(wait, failures[0] + self.window_s - now)
        return int(wait) + 1 if wait > 0 else 0

    def failed(self, username: str, address: str) -> None:
        now = time.monotonic()
        for key in (f"u:{username.lower()}", f"a:{address}"):
            self._live(key, now).append(now)
        if len(self._failures) > 100_000:  # forget idle keys rather than grow without end
            for key in [k for k, v in self._failures.items() if not v]:
                del self._failures[key]

    def succeeded(self, username: str) -> None:
        self._failures.pop(f"u:{username.lower()}", None)


def csrf_ok(expected: str, presented: str | None) -> bool:
    """Constant-time comparison of a form's CSRF token with the session's."""
    return bool(presented) and hmac.compare_digest(expected.encode(), (presented or "").encode())
