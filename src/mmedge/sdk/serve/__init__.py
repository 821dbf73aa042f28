"""`mmedge serve`: an OpenAI-compatible HTTP server over task pipelines (FastAPI + uvicorn).

`config` holds the operator's settings, `app` the routes, `server` the process around them; the
other modules own one concern each (admission, batching, media, metrics, middleware, errors).
Importing this package needs the `serve` extra.
"""
