-- bury: a job used up its attempts. Keep it as a dead letter with its last error, and its
-- alert mail as owed (the alerts zset: tid -> when a sender may try it; the burying
-- consumer mails at once and clears it, a sweep mails what is left: Store.owed_alerts).
-- KEYS[1] jobs hash   KEYS[2] inflight zset   KEYS[3] dead zset   KEYS[4] dead error hash
-- KEYS[5] topic stat hash   KEYS[6] minute stat hash   KEYS[7] topic histogram hash
-- KEYS[8] alerts zset
-- ARGV[1] tid   ARGV[2] version delivered   ARGV[3] last error JSON   ARGV[4] day YYYYMMDD
-- ARGV[5] minute-stat ttl s   ARGV[6] 1 when a callback was made for this attempt, else 0
-- ARGV[7] ms before a sweep may mail the alert (the burying consumer's head start)
-- ARGV[8..] histogram field, increment, field, increment, ... (bumped in KEYS[7])
-- Returns 1 when buried, 0 when the job had been replaced or deleted meanwhile.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local tid = ARGV[1]
if ARGV[6] == '1' then
  for _, f in ipairs({'notifies', 'fail'}) do
    redis.call('HINCRBY', KEYS[5], f, 1)
    redis.call('HINCRBY', KEYS[5], f .. ':' .. ARGV[4], 1)
  end
  redis.call('HINCRBY', KEYS[6], 'fail', 1)
  redis.call('EXPIRE', KEYS[6], tonumber(ARGV[5]))
end
for i = 8, #ARGV - 1, 2 do redis.call('HINCRBY', KEYS[7], ARGV[i], ARGV[i + 1]) end
local payload = redis.call('HGET', KEYS[1], tid)
if not (payload and job_vp(payload) == ARGV[2]) then
  return 0
end
redis.call('ZREM', KEYS[2], tid)
redis.call('ZADD', KEYS[3], now, tid)
redis.call('HSET', KEYS[4], tid, ARGV[3])
redis.call('HINCRBY', KEYS[5], 'dead', 1)
redis.call('HINCRBY', KEYS[5], 'dead:' .. ARGV[4], 1)
redis.call('ZADD', KEYS[8], now + tonumber(ARGV[7]), tid)
return 1
