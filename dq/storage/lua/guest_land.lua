-- guest_land: on the owner, write a guest taken from another shard (guest_take), unless the
-- owner holds a newer copy of the job. The copy is written unscheduled (in no bucket, so
-- nothing fires it yet); 'commit' schedules it once guest_drop has removed the guest, and
-- 'undo' removes it when the guest was deleted or replaced on its shard meanwhile.
-- KEYS[1] jobs hash   KEYS[2] delay zset (the tid's bucket)   KEYS[3] wake list of it
-- KEYS[4] inflight zset   KEYS[5] dead zset   KEYS[6] dead error hash
-- ARGV[1] tid   ARGV[2] mode 'land' | 'commit' | 'undo'   ARGV[3] version
-- ARGV[4] payload ('land')   ARGV[5] due ms ('land', 'commit')
-- ARGV[6] the payload's set ms ('land')
-- Returns 'landed' (written, or already there), 'owner' (the owner's copy is as new or
-- newer: nothing written); for commit 'committed', 'skipped' (the copy here is another
-- version: a later add, or a copy from before the owner's outage) or 'none' (no copy here:
-- a delete came first, or the land went to another shard, the owner of an earlier shard
-- list); 'undone' or 'kept' (undo).
local tid = ARGV[1]
local cur = redis.call('HGET', KEYS[1], tid)
local mine = cur and job_vp(cur) == ARGV[3]
local function remove()
  redis.call('HDEL', KEYS[1], tid)
  redis.call('ZREM', KEYS[2], tid)
  redis.call('ZREM', KEYS[4], tid)
  if redis.call('ZREM', KEYS[5], tid) == 1 then redis.call('HDEL', KEYS[6], tid) end
end
if ARGV[2] == 'undo' then
  if mine then
    remove()
    return 'undone'
  end
  return 'kept'
end
if ARGV[2] == 'commit' then
  if not cur then return 'none' end
  if not mine then return 'skipped' end
  if not redis.call('ZSCORE', KEYS[2], tid) then
    redis.call('ZADD', KEYS[2], ARGV[5], tid)
    wake_if_first(KEYS[2], KEYS[3], tid)
  end
  return 'committed'
end
if cur then
  if mine then return 'landed' end
  if job_set(cur) >= tonumber(ARGV[6]) then return 'owner' end
  remove()  -- an older copy (the owner came back with it): the guest replaces it
end
redis.call('HSET', KEYS[1], tid, ARGV[4])
return 'landed'
