"""`wanengine serve`: an HTTP video service (the OpenAI Videos API's shape) over one loaded
`Engine`, on one device or a whole torchrun job. It uses the engine; the engine never knows.

- `submission`: a request body (JSON or multipart) -> validated options + decoded image, by
  the CLI's own validation; every failure is a `RequestError` (HTTP status + one line).
- `jobs`: job records, persisted as JSON beside the outputs; restart recovery and TTL removal.
- `service`: the bounded queue, submit / cancel / delete, and the worker thread.
- `ranks`: what rank 0 tells the other ranks of a torchrun job (jobs, stop decisions at every
  step boundary, heartbeats), one generation on every rank, and the other ranks' loop.
- `metrics`: counters and their Prometheus text.
- `app`: the FastAPI routes; `server`: preflight, engine load, uvicorn, shutdown;
  `command`: the typer command registered as `wanengine serve`.

FastAPI and uvicorn come with the optional `[serve]` extra; only `app` and `server` import them.
"""
