"""Exit 0 when the dcl-embed API on this host returns 200 for /healthz, else 1.

The images run it as their HEALTHCHECK, so it uses only the standard library. It
reads the port from DCL_PORT (default 8000) and always connects to 127.0.0.1,
because the server binds every address inside a container.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_SECONDS = 3.0


def main() -> int:
    port = os.environ.get("DCL_PORT", "8000")
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            status = response.status
    except (urllib.error.URLError, OSError) as exc:
        sys.stderr.write(f"health check failed: GET {url}: {exc}\n")
        return 1
    if status != 200:
        sys.stderr.write(f"health check failed: GET {url} returned {status}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
