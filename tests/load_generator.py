"""Loopback load: `python load_generator.py BASE_URL SECONDS THREADS PATH...`; prints JSON counts.

Keep-alive connections, one per thread, cycling through the paths; every answer's status is
counted, and every body is parsed as JSON (an unparsable body counts as an error).
"""

import http.client
import json
import sys
import threading
import time
import urllib.parse


def hammer(host, port, paths, deadline, counts, lock):
    conn = http.client.HTTPConnection(host, port, timeout=10)
    local: dict[str, int] = {}
    index = 0
    while time.monotonic() < deadline:
        path = paths[index % len(paths)]
        index += 1
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            json.loads(response.read())
            key = str(response.status)
        except Exception as exc:  # every failure is counted, by kind
            key = f"error:{type(exc).__name__}"
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=10)
        local[key] = local.get(key, 0) + 1
    with lock:
        for key, value in local.items():
            counts[key] = counts.get(key, 0) + value


def main():
    base, seconds, threads, *paths = sys.argv[1:]
    url = urllib.parse.urlsplit(base)
    deadline = time.monotonic() + float(seconds)
    counts: dict[str, int] = {}
    lock = threading.Lock()
    workers = [threading.Thread(target=hammer, args=(url.hostname, url.port, paths, deadline, counts, lock))
               for _ in range(int(threads))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
