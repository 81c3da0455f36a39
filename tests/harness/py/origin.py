"""An HTTP/1.1 origin for the HTTP layer's tests (Debian's python3).

Answers every request with its own name as the body, after an optional
delay; echoes request headers named in `x-echo` back as `x-echoed-<name>`;
appends one line per request ("METHOD PATH BODY_BYTES") to a log file.
A path /status/CODE/PERCENT... answers CODE to PERCENT % of its requests
(at random, seeded by NAME: the same sequence on every run). A client that goes away during the delay is logged as
"CANCELLED PATH" (the proxy cancelled the request).

usage: origin.py NAME ADDR PORT LOG [DELAY_MS [STATUS]]
(STATUS: answer every request with it, a broken endpoint)
"""
import http.server
import random
import select
import socket
import sys
import threading
import time

NAME, ADDR, PORT, LOG = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
DELAY = float(sys.argv[5]) / 1000 if len(sys.argv) > 5 else 0.0
STATUS = int(sys.argv[6]) if len(sys.argv) > 6 else 200
LOCK = threading.Lock()
# The same share of failures on every run (requests arrive in order).
random.seed(NAME)
LOG_FILE = open(LOG, "a", buffering=1)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out as two writes: without TCP_NODELAY the body
    # waits for the peer's delayed ACK (40 ms per request).
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def answer(self):
        length = int(self.headers.get("content-length") or 0)
        got = len(self.rfile.read(length)) if length else 0
        with LOCK:
            LOG_FILE.write(f"{self.command} {self.path} {got}\n")
        if DELAY and self.client_gone(DELAY):
            with LOCK:
                LOG_FILE.write(f"CANCELLED {self.path}\n")
            self.close_connection = True
            return
        status = STATUS
        parts = self.path.split("/")
        if len(parts) > 3 and parts[1] == "status" and random.random() * 100 < float(parts[3]):
            status = int(parts[2])
        body = NAME.encode()
        self.send_response(status)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        # /close...: the application ends the connection after answering
        # (as a server at its keep-alive request limit does).
        if self.path.startswith("/close"):
            self.send_header("connection", "close")
            self.close_connection = True
        for name in (self.headers.get("x-echo") or "").split(","):
            name = name.strip()
            if name:
                self.send_header(f"x-echoed-{name}", self.headers.get(name, "(none)"))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def client_gone(self, wait):
        """Waits `wait` seconds; True as soon as the client closes."""
        start = time.monotonic()
        readable, _, _ = select.select([self.connection], [], [], wait)
        if not readable:
            return False
        try:
            if self.connection.recv(1, socket.MSG_PEEK) == b"":
                return True
        except OSError:
            return True
        # A pipelined request, not an end: wait out the rest.
        time.sleep(max(0.0, wait - (time.monotonic() - start)))
        return False

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = answer


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256


Server((ADDR, PORT), Handler).serve_forever()
