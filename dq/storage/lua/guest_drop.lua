-- guest_drop: on the guest's shard, after guest_land. Modes:
--   'drop'    remove the taken copy here; the mark becomes "<version>|<due>|d" until the
--             owner's copy is committed (guest_land 'commit') and 'finish' clears it
--   'finish'  clear a "|d" mark (and forget the guest, unless it has been added here again)
--   'untake'  the owner cannot be reached: put the job back in its bucket here, keeping
--             the mark as "<version>|<due>|u" in case an earlier land reached the owner
--   'forget'  clear the mark and forget the guest; the job stays here (a dead letter)
-- KEYS[1] jobs hash   KEYS[2] delay zset (the tid's bucket)   KEYS[3] guests set
-- KEYS[4] moving hash   KEYS[5] wake list of the bucket
-- ARGV[1] tid   ARGV[2] mode   ARGV[3] version taken
-- Returns 'dropped', 'finished', 'untaken' or 'forgotten'; 'changed' when the job was
-- deleted or replaced here since the take (a replacement is a new guest, moved by a later
-- sweep; when untaking, the mark stays for a sweep that can reach the owner); 'kept' or
-- 'gone' when another mover finished this take first (kept: the job is here again). After
-- 'changed' or 'kept', a copy this mover landed on the owner must be undone.
local tid = ARGV[1]
local mark = redis.call('HGET', KEYS[4], tid)
local payload = redis.call('HGET', KEYS[1], tid)
local same = payload and job_vp(payload) == ARGV[3]
local mv, mdue, back = nil, nil, nil
if mark then mv, mdue, back = string.match(mark, '^(%x+)|(%d+)(.*)$') end
local function forget()
  redis.call('HDEL', KEYS[4], tid)
  if not payload then redis.call('SREM', KEYS[3], tid) end
end
if mv ~= ARGV[3] then
  if same then return 'kept' end
  return 'gone'
end
if back == '|d' then  -- dropped already, by this move or another mover of it
  if ARGV[2] == 'finish' or ARGV[2] == 'forget' then
    forget()
    return 'finished'
  end
  return 'dropped'
end
if ARGV[2] == 'finish' then return 'gone' end
if ARGV[2] == 'forget' then
  redis.call('HDEL', KEYS[4], tid)
  redis.call('SREM', KEYS[3], tid)
  return 'forgotten'
end
if not same then
  if ARGV[2] == 'untake' then return 'changed' end
  forget()
  return 'changed'
end
if back ~= '' then return 'kept' end  -- put back in its bucket by another mover
if ARGV[2] == 'untake' then
  redis.call('HSET', KEYS[4], tid, mark .. '|u')
  redis.call('ZADD', KEYS[2], mdue, tid)
  wake_if_first(KEYS[2], KEYS[5], tid)
  return 'untaken'
end
redis.call('HDEL', KEYS[1], tid)
redis.call('HSET', KEYS[4], tid, mark .. '|d')
return 'dropped'
