-- retry: a delivery failed with attempts left. Store the new payload (next attempt number,
-- new version) and the attempt's error (shown while the job waits), and schedule it after
-- the back-off, unless the job changed meanwhile.
-- KEYS[1] jobs hash   KEYS[2] inflight zset   KEYS[3] delay zset (the tid's bucket)
-- KEYS[4] wake list of that bucket   KEYS[5] topic stat hash   KEYS[6] minute stat hash
-- KEYS[7] topic histogram hash   KEYS[8] last error hash (the dead letters' error hash)
-- ARGV[1] tid   ARGV[2] version delivered   ARGV[3] new payload   ARGV[4] back-off ms
-- ARGV[5] day YYYYMMDD   ARGV[6] minute-stat ttl s   ARGV[7] the attempt's error JSON
-- ARGV[8..] histogram field, increment, field, increment, ... (bumped in KEYS[7])
-- Returns {1, due ms} when rescheduled, {0, 0} when the job had been replaced or deleted.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local tid = ARGV[1]
for _, f in ipairs({'notifies', 'fail', 'retries'}) do
  redis.call('HINCRBY', KEYS[5], f, 1)
  redis.call('HINCRBY', KEYS[5], f .. ':' .. ARGV[5], 1)
end
redis.call('HINCRBY', KEYS[6], 'fail', 1)
redis.call('EXPIRE', KEYS[6], tonumber(ARGV[6]))
for i = 8, #ARGV - 1, 2 do redis.call('HINCRBY', KEYS[7], ARGV[i], ARGV[i + 1]) end
local payload = redis.call('HGET', KEYS[1], tid)
if not (payload and job_vp(payload) == ARGV[2]) then
  return {0, 0}
end
local due = now + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], tid, ARGV[3])
redis.call('HSET', KEYS[8], tid, ARGV[7])
redis.call('ZREM', KEYS[2], tid)
redis.call('ZADD', KEYS[3], due, tid)
wake_if_first(KEYS[3], KEYS[4], tid)
return {1, due}
