-- redrive: give a dead letter a fresh set of attempts and make it due now.
-- KEYS[1] jobs hash   KEYS[2] dead zset   KEYS[3] dead error hash
-- KEYS[4] delay zset (the tid's bucket)   KEYS[5] wake list of that bucket
-- KEYS[6] guests set
-- ARGV[1] tid   ARGV[2] new payload (attempts reset, new version)
-- ARGV[3] 1 when this shard is not the tid's owner (the job is a guest here), else 0
-- Returns 1 when redriven, 0 when the tid was not a dead letter.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local tid = ARGV[1]
if redis.call('ZREM', KEYS[2], tid) == 0 then return 0 end
redis.call('HDEL', KEYS[3], tid)
redis.call('HSET', KEYS[1], tid, ARGV[2])
redis.call('ZADD', KEYS[4], now, tid)
if ARGV[3] == '1' then redis.call('SADD', KEYS[6], tid) end
redis.call('RPUSH', KEYS[5], 1)
redis.call('LTRIM', KEYS[5], -1, -1)
return 1
