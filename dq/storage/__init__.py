"""The job state machine: sole owner of key names, the payload format and the Lua scripts."""
