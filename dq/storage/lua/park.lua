-- park: a claimed job that was not called (its topic is unknown or offline, its breaker is
-- open, or too little of its lease was left) goes back to its delay bucket, due again after
-- ARGV[3] ms, without counting an attempt (an expired lease would count one:
-- requeue_expired.lua).
-- KEYS[1] jobs hash   KEYS[2] inflight zset   KEYS[3] delay zset (the tid's bucket)
-- KEYS[4] wake list of that bucket
-- ARGV[1] tid   ARGV[2] version claimed   ARGV[3] ms until it is looked at again
-- Returns 1 when parked, 0 when the job had been replaced or deleted meanwhile.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local tid = ARGV[1]
local payload = redis.call('HGET', KEYS[1], tid)
if not (payload and job_vp(payload) == ARGV[2]) then
  return 0
end
redis.call('ZREM', KEYS[2], tid)
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), tid)
wake_if_first(KEYS[3], KEYS[4], tid)
return 1
