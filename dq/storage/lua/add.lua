-- add: store (or replace) jobs and schedule each in its delay bucket. The adds a process
-- makes in one event-loop turn come as one call (Redis's per-call cost, and the counters,
-- are paid once per batch).
-- KEYS[1] jobs hash   KEYS[2] inflight zset   KEYS[3] dead zset   KEYS[4] last error hash
-- KEYS[5] per-minute stat hash   KEYS[6] guests set (jobs whose owner is another shard)
-- then per job: delay zset (the tid's bucket), wake list of that bucket, topic stat hash
-- ARGV[1] day YYYYMMDD   ARGV[2] minute-stat ttl s
-- ARGV[3] deadline, epoch-ms on this shard's clock ('' = none): a call that runs later
--   writes nothing and fails with LATE, for its sender has answered its client without
--   it (from another shard, or 'unavailable': dq/storage/store.py, add_timeout)
-- then per job: tid, payload, due epoch-ms ('' = now + delay), delay ms, guest 1|0 (1: its
-- owner was passed over, being down; the checker moves it home later, guest_take.lua)
-- Returns {replaced 0|1, due ms, replaced, due, ...} in job order.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local deadline = tonumber(ARGV[3])
if deadline and now > deadline then
  return redis.error_reply('LATE add ran ' .. (now - deadline) .. ' ms after its deadline: not written')
end
local out = {}
local writes = {}      -- topic stat key -> jobs written
local buckets = {}     -- delay key -> wake key, for the buckets written to
local soonest = {}     -- delay key -> earliest due of this batch's jobs in it
local n = (#ARGV - 3) / 5
for j = 0, n - 1 do
  local k, a = 7 + 3 * j, 4 + 5 * j
  local tid = ARGV[a]
  local due = tonumber(ARGV[a + 2])
  if not due then due = now + tonumber(ARGV[a + 3]) end
  local created = redis.call('HSET', KEYS[1], tid, ARGV[a + 1])
  redis.call('ZADD', KEYS[k], due, tid)
  if created == 0 then
    -- A replaced job leaves any old delivery behind (its ack carries the old version), and
    -- its old last error: the new job has not failed.
    redis.call('ZREM', KEYS[2], tid)
    redis.call('ZREM', KEYS[3], tid)
    redis.call('HDEL', KEYS[4], tid)
  end
  if ARGV[a + 4] == '1' then redis.call('SADD', KEYS[6], tid) end
  buckets[KEYS[k]] = KEYS[k + 1]
  if not soonest[KEYS[k]] or due < soonest[KEYS[k]] then soonest[KEYS[k]] = due end
  writes[KEYS[k + 2]] = (writes[KEYS[k + 2]] or 0) + 1
  out[2 * j + 1] = 1 - created
  out[2 * j + 2] = due
end
-- Wake a bucket's timer only when one of these jobs became the bucket's earliest (its due
-- is the earliest there; a tie with an older job wakes the timer for nothing, harmlessly).
-- A timer looks again within its tick (at most WAKE_WITHIN = 60 s, dq/config.py), so a job
-- due later than that needs no wake and no look at the bucket.
for delay, wake in pairs(buckets) do
  if soonest[delay] < now + 60000 then
    local first = redis.call('ZRANGE', delay, 0, 0, 'WITHSCORES')
    if first[2] and tonumber(first[2]) >= soonest[delay] then
      redis.call('RPUSH', wake, 1)
      redis.call('LTRIM', wake, -1, -1)
    end
  end
end
for key, count in pairs(writes) do
  redis.call('HINCRBY', key, 'writes', count)
  redis.call('HINCRBY', key, 'writes:' .. ARGV[1], count)
end
redis.call('HINCRBY', KEYS[5], 'writes', n)
redis.call('EXPIRE', KEYS[5], tonumber(ARGV[2]))
return out
