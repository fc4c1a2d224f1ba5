-- guest_drop: the last step of moving a guest home (see guest_take): remove the taken copy
-- here, or ('untake', when the owner could not be written) put it back in its bucket.
-- KEYS[1] jobs hash   KEYS[2] delay zset (the tid's bucket)   KEYS[3] guests set
-- KEYS[4] moving hash   KEYS[5] wake list of the bucket
-- ARGV[1] tid   ARGV[2] mode 'drop' | 'untake'   ARGV[3] version taken
-- Returns 'dropped' or 'untaken'; 'changed' when the job was deleted or replaced here since
-- the take (a replacement is a new guest, moved by a later sweep; when untaking, the mark
-- stays for a sweep that can reach the owner), and 'kept' or 'gone' when another mover
-- finished this take first (kept: it put the job back here). After 'changed' or 'kept',
-- a copy this mover landed on the owner must be undone.
local tid = ARGV[1]
local mark = redis.call('HGET', KEYS[4], tid)
local payload = redis.call('HGET', KEYS[1], tid)
local same = payload and job_vp(payload) == ARGV[3]
if not (mark and string.match(mark, '^(%x+)|') == ARGV[3]) then
  if same then return 'kept' end
  return 'gone'
end
if not same then
  -- Untaking (the owner is down): keep the mark, so that once the owner answers, a copy
  -- an earlier move may have landed there is undone before the mark goes.
  if ARGV[2] == 'untake' then return 'changed' end
  redis.call('HDEL', KEYS[4], tid)
  if not payload then redis.call('SREM', KEYS[3], tid) end
  return 'changed'
end
redis.call('HDEL', KEYS[4], tid)
if ARGV[2] == 'untake' then
  redis.call('ZADD', KEYS[2], string.match(mark, '|(%d+)$'), tid)
  wake_if_first(KEYS[2], KEYS[5], tid)
  return 'untaken'
end
redis.call('HDEL', KEYS[1], tid)
redis.call('SREM', KEYS[3], tid)
return 'dropped'
