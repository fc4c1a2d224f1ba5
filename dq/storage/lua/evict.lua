-- evict: jobs just added on their owner shard; remove any older copy of them left here as a
-- guest (written while the owner was down, see guest_take.lua), so it cannot fire too.
-- A copy being moved home (marked moving) loses its payload: the mover's guest_drop then
-- sees the job changed and undoes what it landed. A copy in a ready list loses its payload
-- too, so claim skips it, as a re-add on one shard makes its old ready entry stale; one in
-- flight loses it and its lease, as delete.lua does, so its ack, retry or bury finds the
-- job changed (the call under way finishes; the replaced job is not retried). A dead
-- letter is left: it never fires.
-- KEYS[1] jobs hash   KEYS[2] guests set   KEYS[3] moving hash   KEYS[4] inflight zset
-- KEYS[5] dead zset   then per job: delay zset (the tid's bucket)
-- ARGV per job: tid
-- Returns, per job, 1 when a copy was removed, else 0.
local out = {}
for j = 1, #ARGV do
  local tid = ARGV[j]
  out[j] = 0
  if redis.call('SISMEMBER', KEYS[2], tid) == 1 then
    if redis.call('HEXISTS', KEYS[3], tid) == 1 then
      redis.call('HDEL', KEYS[1], tid)
      redis.call('ZREM', KEYS[5 + j], tid)  -- put back in its bucket ("|u") by a mover
      redis.call('ZREM', KEYS[4], tid)      -- and claimed since
      out[j] = 1
    elseif not redis.call('ZSCORE', KEYS[5], tid) then  -- delayed, ready or in flight
      redis.call('ZREM', KEYS[5 + j], tid)
      redis.call('ZREM', KEYS[4], tid)
      out[j] = redis.call('HDEL', KEYS[1], tid)  -- 0: already gone
      redis.call('SREM', KEYS[2], tid)
    end
  end
end
return out
