-- ack: deliveries succeeded. Delete each job unless it was replaced while in flight. The
-- acks a consumer makes in one event-loop turn come as one call; counters are bumped once
-- per batch and topic.
-- KEYS[1] jobs hash   KEYS[2] inflight zset   KEYS[3] minute stat hash
-- KEYS[4] last error hash (a retried job's error goes with it)
-- then per job: topic stat hash, topic histogram hash
-- ARGV[1] day YYYYMMDD   ARGV[2] minute-stat ttl s
-- then per job: tid, version delivered, n, then n histogram (field, increment) pairs
-- Returns per job 1 when the job was removed, 0 when it had been replaced or deleted.
local out = {}
local oks = {}   -- topic stat key -> deliveries
local hist = {}  -- histogram key -> field -> increment
local a, j = 3, 0
while a <= #ARGV do
  local kstat, khist = KEYS[5 + 2 * j], KEYS[6 + 2 * j]
  local tid, version, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  oks[kstat] = (oks[kstat] or 0) + 1
  if n > 0 then
    local h = hist[khist] or {}
    hist[khist] = h
    for i = a + 3, a + 1 + 2 * n, 2 do h[ARGV[i]] = (h[ARGV[i]] or 0) + tonumber(ARGV[i + 1]) end
  end
  local payload = redis.call('HGET', KEYS[1], tid)
  if payload and job_vp(payload) == version then
    redis.call('HDEL', KEYS[1], tid)
    redis.call('ZREM', KEYS[2], tid)
    redis.call('HDEL', KEYS[4], tid)
    out[j + 1] = 1
  else
    out[j + 1] = 0
  end
  a = a + 3 + 2 * n
  j = j + 1
end
for key, count in pairs(oks) do
  redis.call('HINCRBY', key, 'notifies', count)
  redis.call('HINCRBY', key, 'notifies:' .. ARGV[1], count)
  redis.call('HINCRBY', key, 'ok', count)
  redis.call('HINCRBY', key, 'ok:' .. ARGV[1], count)
end
redis.call('HINCRBY', KEYS[3], 'ok', j)
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[2]))
for key, fields in pairs(hist) do
  for f, c in pairs(fields) do redis.call('HINCRBY', key, f, c) end
end
return out
