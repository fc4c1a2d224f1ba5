-- Prepended to every script (dq/shards.py). A job's payload starts with its version and
-- priority: "<version>|<priority>|<attempt>|<due>|<due - set>|<body JSON>", or, as
-- dq 0.1 wrote it, JSON starting {"v":"<version>","p":<priority>.
local function job_vp(payload)
  local v, p = string.match(payload, '^(%x+)|(%d)|')
  if not v then v, p = string.match(payload, '^{"v":"(%x+)","p":(%d)') end
  p = tonumber(p) or 2
  if p < 1 or p > 3 then p = 2 end
  return v, p
end
