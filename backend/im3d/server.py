"""`python -m im3d.server`: run the backend HTTP API (the code lives in `im3d.service`).

Modules: `service.app` (routes, error handlers), `service.auth` (Host check, bearer token),
`service.schemas` (request/response bodies), `service.serving` (socket, uvicorn), `service.worker`
(queue + worker thread), `service.store` (job folders on disk), `service.uploads` (upload checks).

    python -m im3d.server --jobs-dir D --port P --token-file F      # or: im3d serve
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from im3d.errors import Im3dError, exit_code
from im3d.service.app import create_app
from im3d.service.auth import load_or_create_token
from im3d.service.serving import bind_socket, load_run_fn, print_ready, serve

__all__ = ["bind_socket", "create_app", "load_or_create_token", "main", "serve"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m im3d.server", description="Run the IM-3D backend HTTP API.")
    parser.add_argument("--jobs-dir", help="folder for job folders (server.jobs_dir)")
    parser.add_argument("--port", type=int, help="TCP port; 0 picks a free one (server.port)")
    parser.add_argument("--token-file", help="bearer token file, created when absent (server.token_file)")
    parser.add_argument("--preset", default="standard", help="config preset: fast, standard, high")
    parser.add_argument("--config", help="JSON or TOML config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. server.max_queue=4")
    parser.add_argument("--runner", help="module:function used instead of im3d.pipeline.run_job (tests, other pipelines)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from im3d.config import load_config

    assignments = list(args.set)
    if args.jobs_dir:
        assignments.append(f"server.jobs_dir={json.dumps(str(args.jobs_dir))}")
    if args.token_file:
        assignments.append(f"server.token_file={json.dumps(str(args.token_file))}")
    try:
        config = load_config(args.preset, file=args.config, assignments=assignments)
        if args.port is not None:  # 0 (a free port) is allowed here, unlike in the config
            config.server.port = args.port
        run_fn = load_run_fn(args.runner) if args.runner else None
        serve(config, ready=print_ready, run_fn=run_fn)
    except Im3dError as error:
        print(f"error ({error.code}): {error.message}", file=sys.stderr)
        return exit_code(error.code)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

