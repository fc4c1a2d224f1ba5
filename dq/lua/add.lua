-- add: store (or replace) a job and schedule it in its delay bucket.
-- KEYS[1] jobs hash      KEYS[2] delay zset (the tid's bucket)   KEYS[3] wake list of that bucket
-- KEYS[4] inflight zset  KEYS[5] dead zset   KEYS[6] dead error hash
-- KEYS[7] topic stat hash                    KEYS[8] per-minute stat hash
-- ARGV[1] tid   ARGV[2] payload JSON   ARGV[3] due epoch-ms ('' = use ARGV[4])
-- ARGV[4] delay ms from the shard's clock    ARGV[5] day YYYYMMDD   ARGV[6] minute-stat ttl s
-- Returns {replaced 0|1, due ms}.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local due = tonumber(ARGV[3])
if not due then due = now + tonumber(ARGV[4]) end
local tid = ARGV[1]
local created = redis.call('HSET', KEYS[1], tid, ARGV[2])
redis.call('ZADD', KEYS[2], due, tid)
-- A replaced job leaves any old delivery behind: that delivery's ack carries the old version.
redis.call('ZREM', KEYS[4], tid)
if redis.call('ZREM', KEYS[5], tid) == 1 then redis.call('HDEL', KEYS[6], tid) end
-- Wake the bucket's timer only when this job became the bucket's earliest.
local first = redis.call('ZRANGE', KEYS[2], 0, 0)
if first[1] == tid then
  redis.call('RPUSH', KEYS[3], 1)
  redis.call('LTRIM', KEYS[3], -1, -1)
end
redis.call('HINCRBY', KEYS[7], 'writes', 1)
redis.call('HINCRBY', KEYS[7], 'writes:' .. ARGV[5], 1)
redis.call('HINCRBY', KEYS[8], 'writes', 1)
redis.call('EXPIRE', KEYS[8], tonumber(ARGV[6]))
return {1 - created, due}
