"""A keep-alive HTTP/1.1 client for the HTTP layer's tests: COUNT requests
over one connection, a summary as JSON on stdout.

usage: client.py HOST PORT PATH COUNT [HEADER:VALUE ...] ("method:POST"
sets the method, "body:N" sends N bytes with each request, "for:S" keeps
sending for S seconds instead of COUNT requests, "pace:MS" waits MS
between requests)
output: {"bodies": {body: n}, "statuses": {code: n}, "p50_ms": x,
         "p99_ms": x, "headers": {name: value of the last response},
         "refused_headers": {... of the last response that was not 200},
         "connections": n}
"""
import http.client
import json
import sys
import time

host, port, path, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
extra = dict(h.split(":", 1) for h in sys.argv[5:])
method = extra.pop("method", "GET")
payload = b"x" * int(extra.pop("body", "0")) or None
until = time.monotonic() + float(extra.pop("for")) if "for" in extra else None
pace = float(extra.pop("pace", "0")) / 1000
refused = {}
bodies, statuses, times, last = {}, {}, [], {}
conn = http.client.HTTPConnection(host, port, timeout=30)
connections = 1
sent = 0
while (time.monotonic() < until) if until else (sent < count):
    sent += 1
    if pace and sent > 1:
        time.sleep(pace)
    start = time.monotonic()
    try:
        conn.request(method, path, body=payload, headers=extra)
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
        status = resp.status
        last = {k.lower(): v for k, v in resp.getheaders()}
        if status != 200:
            refused = last
        if resp.will_close:
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=30)
            connections += 1
    except Exception as e:  # a failed request is a result too
        body, status = f"error: {type(e).__name__}", 0
        conn.close()
        conn = http.client.HTTPConnection(host, port, timeout=30)
        connections += 1
    times.append((time.monotonic() - start) * 1000)
    bodies[body] = bodies.get(body, 0) + 1
    statuses[str(status)] = statuses.get(str(status), 0) + 1
times.sort()
print(json.dumps({
    "bodies": bodies,
    "statuses": statuses,
    "p50_ms": times[len(times) // 2],
    "p99_ms": times[min(len(times) - 1, len(times) * 99 // 100)],
    "headers": last,
    "refused_headers": refused,
    "connections": connections,
}))
