"""The job state machine: sole owner of key names, the payload format and the Lua scripts."""

from dq.storage import scripts as scripts  # registers the Lua scripts with the shard layer
