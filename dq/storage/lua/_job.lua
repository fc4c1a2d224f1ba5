-- Prepended to every script (dq/sharding/shards.py). A job's payload starts with its version and
-- priority: "<version>|<priority>|<attempt>|<due>|<due - set>|<body JSON>", or, as
-- dq 0.1 wrote it, JSON starting {"v":"<version>","p":<priority>.
local function job_vp(payload)
  local v, p = string.match(payload, '^(%x+)|(%d)|')
  if not v then v, p = string.match(payload, '^{"v":"(%x+)","p":(%d)') end
  p = tonumber(p) or 2
  if p < 1 or p > 3 then p = 2 end
  return v, p
end
-- When the job was added or last written (epoch ms): due - (due - set), or dq 0.1's "set".
-- due - set is negative for a job added with a due time already past ("-3e8").
local function job_set(payload)
  local due, sign, ahead = string.match(payload, '^%x+|%d|%d+|(%x+)|(%-?)(%x+)|')
  if due then
    ahead = tonumber(ahead, 16)
    if sign == '-' then ahead = -ahead end
    return tonumber(due, 16) - ahead
  end
  if string.sub(payload, 1, 1) == '{' then  -- dq 0.1: its fields come before the body
    return tonumber(string.match(payload, '^{[^{]-"set":(%d+)')) or 0
  end
  return 0
end
-- Make a job the earliest-due wake its bucket's timer (a one-item list it blocks on).
local function wake_if_first(delay, wake, tid)
  local first = redis.call('ZRANGE', delay, 0, 0)
  if first[1] == tid then
    redis.call('RPUSH', wake, 1)
    redis.call('LTRIM', wake, -1, -1)
  end
end
-- The payload with its attempt number one higher (a delivery was cut off), or nil when
-- it has none to bump (unreadable). dq 0.1's JSON keeps the count in "n", before "body".
local function job_count_delivery(payload)
  local head, n, rest = string.match(payload, '^(%x+|%d|)(%d+)(|.*)$')
  if head then return head .. (tonumber(n) + 1) .. rest end
  if string.sub(payload, 1, 1) ~= '{' then return nil end
  local cut = string.find(payload, '"body":', 1, true) or (#payload + 1)
  local fields, bumped = string.sub(payload, 1, cut - 1), 0
  fields, bumped = string.gsub(fields, '([{,]"n":)(%d+)',
                               function(k, m) return k .. (tonumber(m) + 1) end, 1)
  if bumped == 0 then return nil end
  return fields .. string.sub(payload, cut)
end
