-- guest_take: the first step of moving a guest home. A guest is a job written to this shard
-- while its owner was down (the add recorded its tid in the guests set). Take it out of its
-- delay bucket, so no timer here fires it while it moves, and mark it moving with its
-- version and due time; guest_land writes it on the owner, guest_drop removes it here.
-- An unfinished earlier take (the mover died) is resumed from the mark.
-- KEYS[1] jobs hash   KEYS[2] delay zset (the tid's bucket)   KEYS[3] dead zset
-- KEYS[4] guests set  KEYS[5] moving hash (tid -> "<version>|<due ms>")
-- ARGV[1] tid
-- Returns {status, payload, due ms, version}; status is
--   'take'     move payload (due at due ms) to the owner, then guest_drop
--   'changed'  a mark whose job was deleted or replaced since: guest_drop it, and undo
--              the version on the owner if an earlier move landed it there
--   'gone'     no such job here any more (delivered or deleted): forgotten as a guest
--   'stay'     a dead letter: it stays here (it never fires), forgotten as a guest
--   'busy'     being delivered here (ready or in flight): look again later
local tid = ARGV[1]
local payload = redis.call('HGET', KEYS[1], tid)
local mark = redis.call('HGET', KEYS[5], tid)
if mark then
  local v, due = string.match(mark, '^(%x+)|(%d+)$')
  if payload and job_vp(payload) == v then return {'take', payload, due, v} end
  return {'changed', '', 0, v or ''}
end
if not payload then
  redis.call('SREM', KEYS[4], tid)
  return {'gone', '', 0, ''}
end
local due = redis.call('ZSCORE', KEYS[2], tid)
if not due then
  if redis.call('ZSCORE', KEYS[3], tid) then
    redis.call('SREM', KEYS[4], tid)
    return {'stay', '', 0, ''}
  end
  return {'busy', '', 0, ''}
end
due = string.format('%d', tonumber(due))
local v = job_vp(payload) or '0'
redis.call('ZREM', KEYS[2], tid)
redis.call('HSET', KEYS[5], tid, v .. '|' .. due)
return {'take', payload, due, v}
