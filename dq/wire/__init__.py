"""The original's wire protocol: frames, request validation, fix_time."""
