-- guest_take: the first step of moving a guest home. A guest is a job written to this shard
-- while its owner was down (the add recorded its tid in the guests set). Take it out of its
-- delay bucket, so no timer here fires it while it moves, and mark it moving with its
-- version and due time; guest_land writes it on the owner, guest_drop removes it here.
-- A mark outlives a mover that dies: "<version>|<due>" is a take to finish,
-- "<version>|<due>|u" a take put back in its bucket while the owner was down, whose copy
-- may have been landed on the owner already (and must be undone if this one changes), and
-- "<version>|<due>|d" a move whose copy here is gone and whose landed copy on the owner is
-- still to be committed (scheduled).
-- KEYS[1] jobs hash   KEYS[2] delay zset (the tid's bucket)   KEYS[3] dead zset
-- KEYS[4] guests set  KEYS[5] moving hash
-- ARGV[1] tid
-- Returns {status, payload, due ms, version}; status is
--   'take'     move payload (due at due ms) to the owner, then guest_drop
--   'commit'   dropped here already: commit the version on the owner, then guest_drop
--              'finish'
--   'changed'  marked, but the job was deleted or replaced since: undo the version on the
--              owner (an earlier move may have landed it), then guest_drop
--   'dead'     marked, and the job died here since: undo the version on the owner, then
--              guest_drop 'forget' (the dead letter stays here)
--   'gone'     no such job here any more (delivered or deleted): forgotten as a guest
--   'stay'     a dead letter: it stays here (it never fires), forgotten as a guest
--   'busy'     being delivered here (ready or in flight): look again later
local tid = ARGV[1]
local payload = redis.call('HGET', KEYS[1], tid)
local mark = redis.call('HGET', KEYS[5], tid)
local marked = nil
if mark then
  local v, due, back = string.match(mark, '^(%x+)|(%d+)(.*)$')
  marked = v or ''
  if back == '|d' then return {'commit', '', due, marked} end
  if not (payload and job_vp(payload) == v) then return {'changed', '', 0, marked} end
  if back == '' then return {'take', payload, due, v} end
end
if not payload then
  redis.call('SREM', KEYS[4], tid)
  return {'gone', '', 0, ''}
end
local due = redis.call('ZSCORE', KEYS[2], tid)
if not due then
  if redis.call('ZSCORE', KEYS[3], tid) then
    if marked then return {'dead', '', 0, marked} end
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
