"""``python -m geotrain.membership``: a coordinator process (what ``geotrain run`` starts, and
``geotrain coordinator`` on real deployments)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from geotrain.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    from geotrain.membership.coordinator import serve
    from geotrain.membership.wire import read_token_file

    p = argparse.ArgumentParser(prog="python -m geotrain.membership", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token-file", required=True)
    p.add_argument("--events", help="append membership events here (JSON lines)")
    p.add_argument("--hours", type=float, default=math.inf)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--parent", type=int, help="stop when this process (the launcher) is gone")
    args = p.parse_args(argv)
    try:
        secret = read_token_file(Path(args.token_file))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"coordinator: {msg}", flush=True)

    def ready(port: int) -> None:
        print(f"geotrain coordinator listening on {args.host}:{port}", flush=True)

    try:
        serve(secret, args.host, args.port, events_path=Path(args.events) if args.events else None,
              hours=args.hours, log=log, ready=ready, parent=args.parent)
    except KeyboardInterrupt:
        return 0
    except OSError as e:
        print(f"error: --port: could not listen on {args.host}:{args.port} ({e.strerror or e}); is another "
              "coordinator running? Stop it or choose another --port", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
