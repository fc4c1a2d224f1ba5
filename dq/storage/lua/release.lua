-- release: a job counted in its topic's calls in flight (claim.lua, a topic with a
-- concurrency limit) has had its outcome written: free its slot, unless its lease ran out
-- first (then requeue_expired.lua freed it, and the job may be counted again for another
-- delivery: the lease deadline tells the two apart).
-- KEYS[1] flow hash   KEYS[2] flow lease zset (tid -> lease deadline)
-- ARGV[1] tid   ARGV[2] the lease deadline ms it was claimed with
-- Returns 1 when freed, 0 when it was freed already.
local tid = ARGV[1]
local deadline = redis.call('ZSCORE', KEYS[2], tid)
if not deadline or tonumber(deadline) ~= tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[2], tid)
local field = string.match(tid, '^([^:]*)') .. '|n'
if redis.call('HINCRBY', KEYS[1], field, -1) < 0 then redis.call('HSET', KEYS[1], field, 0) end
return 1
