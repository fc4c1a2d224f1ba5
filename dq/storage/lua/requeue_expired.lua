-- requeue_expired: jobs whose consumer lease ran out (the consumer died or hung) go back to
-- the head of their ready list, so they are delivered again (at-least-once). The delivery
-- that was cut off counts as an attempt: the payload's attempt number goes up by one (the
-- version stays, so the ready entry matches), so the next call says X-Dq-Attempt 2 and a
-- job whose consumer keeps dying runs out of attempts (dq/roles/consumer.py) instead of looping.
-- The slots of expired leases counted in a topic's calls in flight (claim.lua) are freed,
-- so a consumer that dies cannot keep a concurrency slot.
-- KEYS[1] jobs hash   KEYS[2] inflight zset   KEYS[3] ready:1   KEYS[4] ready:2   KEYS[5] ready:3
-- KEYS[6] flow hash   KEYS[7] flow lease zset (tid -> lease deadline)
-- ARGV[1] most jobs to requeue
-- Returns the number requeued.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local tids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local n = 0
for _, tid in ipairs(tids) do
  redis.call('ZREM', KEYS[2], tid)
  local payload = redis.call('HGET', KEYS[1], tid)
  if payload then
    local v, p = job_vp(payload)
    local counted = job_count_delivery(payload)
    if counted then redis.call('HSET', KEYS[1], tid, counted) end
    redis.call('LPUSH', KEYS[2 + p], (v or '0') .. '|' .. tid)
    n = n + 1
  end
end
local slots = redis.call('ZRANGEBYSCORE', KEYS[7], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, tid in ipairs(slots) do
  redis.call('ZREM', KEYS[7], tid)
  local field = string.match(tid, '^([^:]*)') .. '|n'
  if redis.call('HINCRBY', KEYS[6], field, -1) < 0 then redis.call('HSET', KEYS[6], field, 0) end
end
return n
