-- retire: part of a pass over a retired shard (the embedded Redis once real shards are
-- configured; it takes no adds): record its jobs as guests, so the checker's guest sweep
-- moves them home to their owners (dq/storage/guests.py) and an add of the same job elsewhere
-- evicts the copy here (evict.lua). Dead letters stay where they are (they never fire).
-- KEYS[1] jobs hash   KEYS[2] guests set   KEYS[3] dead zset
-- ARGV[1] HSCAN cursor   ARGV[2] HSCAN COUNT
-- Returns {next cursor, how many tids were newly recorded}.
local res = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local kv = res[2]
local added = 0
for i = 1, #kv, 2 do
  if not redis.call('ZSCORE', KEYS[3], kv[i]) then
    added = added + redis.call('SADD', KEYS[2], kv[i])
  end
end
return {res[1], added}
