"""An OpenAI-compatible HTTP front (FastAPI + uvicorn) over a continuously stepped engine.

``protocol`` holds the request and response models, ``engine_loop`` the thread that steps the
engine, ``metrics`` the Prometheus collectors, ``app`` the routes and ``launch`` what
``minidisagg serve --mode ...`` runs. Nothing here is imported by the engine.
"""
