"""The backend as a service: the v1 HTTP API over a job queue (docs/protocol.md).

    app       routes, error handlers, OpenAPI        auth      Host allow-list, bearer token, body cap
    schemas   request / response bodies              serving   socket, token file, uvicorn
    worker    submit, FIFO queue, worker thread      store     job folders, manifests, uploads on disk
    uploads   signature checks, safe unzip, dataset checks
"""
