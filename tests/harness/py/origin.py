"""An HTTP/1.1 origin for the HTTP layer's tests (Debian's python3).

Answers every request with its own name as the body, after an optional
delay; echoes request headers named in `x-echo` back as `x-echoed-<name>`;
appends one line per request ("METHOD PATH") to a log file.

usage: origin.py NAME ADDR PORT LOG [DELAY_MS]
"""
import http.server
import sys
import threading
import time

NAME, ADDR, PORT, LOG = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
DELAY = float(sys.argv[5]) / 1000 if len(sys.argv) > 5 else 0.0
LOCK = threading.Lock()
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
        if DELAY:
            time.sleep(DELAY)
        body = NAME.encode()
        self.send_response(200)
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

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = answer


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256


Server((ADDR, PORT), Handler).serve_forever()
