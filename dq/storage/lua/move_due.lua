-- move_due: move jobs whose due time has come from delay buckets to the ready list of their
-- priority, by the shard's clock. Ready entries are "<version>|<tid>" so a stale entry
-- (job replaced or deleted since) is recognised and skipped by claim.
-- KEYS[1] jobs hash   KEYS[2] ready:1   KEYS[3] ready:2   KEYS[4] ready:3
-- KEYS[5..] delay zsets (the buckets this timer owns)
-- ARGV[1] most jobs to move per bucket
-- Returns {moved, next due ms in these buckets or -1, shard now ms}.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local limit = tonumber(ARGV[1])
local moved = 0
local ready = {{}, {}, {}}
local function flush(p)
  local list = ready[p]
  if #list > 0 then
    redis.call('RPUSH', KEYS[1 + p], unpack(list))
    ready[p] = {}
  end
end
local nextdue = -1
for i = 5, #KEYS do
  local tids = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', now, 'LIMIT', 0, limit)
  if #tids > 0 then
    -- They are the bucket's lowest ranks: one range removal walks the skiplist once,
    -- where a ZREM per member would search it from the top for each (slow at 1M pending).
    redis.call('ZREMRANGEBYRANK', KEYS[i], 0, #tids - 1)
    for _, tid in ipairs(tids) do
      local payload = redis.call('HGET', KEYS[1], tid)
      if payload then
        local v, p = job_vp(payload)
        local list = ready[p]
        list[#list + 1] = (v or '0') .. '|' .. tid
        if #list >= 500 then flush(p) end
        moved = moved + 1
      end
    end
  end
  local first = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  if first[2] then
    local s = tonumber(first[2])
    if nextdue < 0 or s < nextdue then nextdue = s end
  end
end
flush(1)
flush(2)
flush(3)
return {moved, nextdue, now}
