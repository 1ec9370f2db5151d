"""Running the application under uvicorn: the start-up checks, the warnings, and the shutdown.

SIGTERM (and Ctrl-C) start uvicorn's graceful shutdown, which stops accepting connections and waits for the
requests in flight; before that, the queue is closed, so the running job finishes and returns its images,
the waiting ones are answered 503 at once, and nothing new starts. Then the process exits 0."""
from __future__ import annotations

import ipaddress
import sys


def parse_credentials(text: str) -> list[tuple[str, str]]:
    """--api-auth USER:PASS[,USER2:PASS2] as A1111 takes it."""
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--api-auth takes USER:PASSWORD (comma-separated for several), got {item!r}")
        pairs.append((user, password))
    return pairs


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args, engine, limits) -> int:
    import uvicorn

    from .app import create_app

    credentials = parse_credentials(args.api_auth) if args.api_auth else None
    if not is_loopback(args.host) and not credentials:
        print(f"sdcore serve: WARNING: listening on {args.host} without --api-auth: anyone who can reach this "
              "port can run generations on this machine", file=sys.stderr)
    app = create_app(engine, queue_size=args.queue, limits=limits, credentials=credentials,
                     max_body=int(args.max_body_mb * (1 << 20)), default_size=args.size)
    queue = app.state.queue

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            queue.close()  # refuse new jobs, answer the waiting ones; the running one finishes
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=None)
    server = Server(config)
    print(f"sdcore serve: starting on http://{args.host}:{args.port}/ (API under /sdapi/v1, queue of "
          f"{args.queue})", file=sys.stderr, flush=True)
    try:
        server.run()
    except SystemExit:  # uvicorn's exit when it can't listen (it has logged why)
        queue.close()
        raise ValueError(f"can't listen on {args.host}:{args.port} (see the error above)") from None
    queue.close()
    queue.join(timeout=60)
    return 0 if server.started else 2
