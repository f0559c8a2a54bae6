"""One HTTP request from inside a network namespace, for tests that drive nodes there:
``ip netns exec NS python -m tests.netns_http [--stream] METHOD URL [JSON-BODY] [HEADER=VALUE ...]``
prints ``{"status": N, "headers": {...}, "body": "<text>"}``. With ``--stream`` it first prints
``{"first": "<first line of the body>"}`` as soon as that line arrives (a test acts mid-stream)."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    stream = argv[:1] == ["--stream"]
    argv = argv[1:] if stream else argv
    method, url = argv[0], argv[1]
    body = argv[2].encode() if len(argv) > 2 and argv[2] else None
    request = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    for header in argv[3:]:
        name, _, value = header.partition("=")
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            first = b""
            if stream:
                first = response.readline()
                print(json.dumps({"first": first.decode()}), flush=True)
            status, headers, text = response.status, dict(response.headers), (first + response.read()).decode()
    except urllib.error.HTTPError as error:
        status, headers, text = error.code, dict(error.headers), error.read().decode()
    print(json.dumps({"status": status, "headers": headers, "body": text}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
