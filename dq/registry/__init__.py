"""Topics, shards and alert settings in SQL (SQLAlchemy), the cached topic lookup, and the
parsers for a topic's retry_when, retry policy and headers."""
