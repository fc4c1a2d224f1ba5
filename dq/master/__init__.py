"""The arbiter: signals, reload, children (spawn, reap, murder), boot and the embedded
Redis. Standard library only: no redis, aiohttp or SQLAlchemy, no event loop."""
