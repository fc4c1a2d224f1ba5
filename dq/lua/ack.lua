-- ack: a delivery succeeded. Delete the job unless it was replaced while in flight.
-- KEYS[1] jobs hash   KEYS[2] inflight zset   KEYS[3] topic stat hash   KEYS[4] minute stat hash
-- KEYS[5] topic histogram hash (optional)
-- ARGV[1] tid   ARGV[2] version delivered   ARGV[3] day YYYYMMDD   ARGV[4] minute-stat ttl s
-- ARGV[5..] histogram field, increment, field, increment, ... (bumped in KEYS[5])
-- Returns 1 when the job was removed, 0 when it had been replaced or deleted meanwhile.
local tid = ARGV[1]
redis.call('HINCRBY', KEYS[3], 'notifies', 1)
redis.call('HINCRBY', KEYS[3], 'notifies:' .. ARGV[3], 1)
redis.call('HINCRBY', KEYS[3], 'ok', 1)
redis.call('HINCRBY', KEYS[3], 'ok:' .. ARGV[3], 1)
redis.call('HINCRBY', KEYS[4], 'ok', 1)
redis.call('EXPIRE', KEYS[4], tonumber(ARGV[4]))
for i = 5, #ARGV - 1, 2 do redis.call('HINCRBY', KEYS[5], ARGV[i], ARGV[i + 1]) end
local payload = redis.call('HGET', KEYS[1], tid)
if payload and job_vp(payload) == ARGV[2] then
  redis.call('HDEL', KEYS[1], tid)
  redis.call('ZREM', KEYS[2], tid)
  return 1
end
return 0
