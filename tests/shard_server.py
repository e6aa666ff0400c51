"""A plain HTTP server for tests: `python tests/shard_server.py DIR PORT [DELAY]` serves DIR on 127.0.0.1:PORT,
waiting DELAY seconds before each .tar response (so a test can kill it mid-transfer)."""

import functools
import sys
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


class Handler(SimpleHTTPRequestHandler):
    delay = 0.0

    def do_GET(self):
        if self.path.endswith(".tar"):
            time.sleep(self.delay)
        super().do_GET()

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    Handler.delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), functools.partial(Handler, directory=sys.argv[1]))
    server.serve_forever()
