-- rebucket: move delayed jobs to the bucket the current `buckets` setting gives them (the
-- setting changed: a job's bucket is crc32(tid) % buckets, computed by the caller).
-- KEYS[1] jobs hash   KEYS[2] the bucket they are in
-- then per job: its new bucket (delay zset), that bucket's wake list
-- ARGV per job: tid, its score in KEYS[2] when the caller read it
-- An entry still there with that score moves, unless the job was added again since (it is
-- in its new bucket already, newer) or is gone (deleted): then the stale entry only goes.
-- Returns how many moved.
local moved = 0
for j = 0, #ARGV / 2 - 1 do
  local tid, score = ARGV[2 * j + 1], ARGV[2 * j + 2]
  local to, wake = KEYS[3 + 2 * j], KEYS[4 + 2 * j]
  local now = redis.call('ZSCORE', KEYS[2], tid)
  if now and tonumber(now) == tonumber(score) then
    redis.call('ZREM', KEYS[2], tid)
    if redis.call('HEXISTS', KEYS[1], tid) == 1 and not redis.call('ZSCORE', to, tid) then
      redis.call('ZADD', to, score, tid)
      wake_if_first(to, wake, tid)
      moved = moved + 1
    end
  end
end
return moved
