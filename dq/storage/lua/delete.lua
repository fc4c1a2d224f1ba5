-- delete: remove a job wherever it is (delayed, ready, in flight or dead).
-- A tid left in a ready list without payload is skipped by claim.
-- KEYS[1] jobs hash   KEYS[2] delay zset (the tid's bucket)   KEYS[3] inflight zset
-- KEYS[4] dead zset   KEYS[5] dead error hash                 KEYS[6] topic stat hash
-- KEYS[7] php-delayqueue's job hash (a job of the original not adopted yet, dq/storage/adopt.py;
--         its entries left without a body are dropped when adopting), or KEYS[1] again
-- ARGV[1] tid   ARGV[2] day YYYYMMDD
-- Returns 1 when a job was deleted, 0 when there was none.
local tid = ARGV[1]
local n = redis.call('HDEL', KEYS[1], tid)
if redis.call('HDEL', KEYS[7], tid) == 1 then n = 1 end
redis.call('ZREM', KEYS[2], tid)
redis.call('ZREM', KEYS[3], tid)
redis.call('ZREM', KEYS[4], tid)
redis.call('HDEL', KEYS[5], tid)
if n == 1 then
  redis.call('HINCRBY', KEYS[6], 'dels', 1)
  redis.call('HINCRBY', KEYS[6], 'dels:' .. ARGV[2], 1)
end
return n
