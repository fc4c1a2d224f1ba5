"""dq's web console and JSON admin API (FastAPI). `web` imports `dq`; `dq` never imports `web`."""
