"""A plain HTTP server for tests: `python tests/shard_server.py DIR PORT [DELAY [MODE]]` serves DIR on
127.0.0.1:PORT, waiting DELAY seconds before each .tar response (so a test can kill it mid-transfer).

MODE (hostile or broken servers): `trickle` answers a .tar request with its headers and then one byte every
DELAY seconds; `hang` accepts every connection and never answers. With SHARD_SERVER_LOG=FILE, each request's
path is appended to FILE (a test counts downloads)."""

import functools
import os
import sys
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


class Handler(SimpleHTTPRequestHandler):
    delay = 0.0
    mode = "plain"

    def do_GET(self):
        if os.environ.get("SHARD_SERVER_LOG"):
            with open(os.environ["SHARD_SERVER_LOG"], "a") as log:
                log.write(self.path + "\n")
        if self.mode == "hang":
            time.sleep(3600)
        if self.path.endswith(".tar"):
            if self.mode == "trickle":
                return self.trickle()
            time.sleep(self.delay)
        super().do_GET()

    def trickle(self):
        data = open(self.translate_path(self.path), "rb").read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        for i in range(len(data)):
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()
            time.sleep(self.delay)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    Handler.delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    Handler.mode = sys.argv[4] if len(sys.argv) > 4 else "plain"
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), functools.partial(Handler, directory=sys.argv[1]))
    server.daemon_threads = True
    server.serve_forever()
