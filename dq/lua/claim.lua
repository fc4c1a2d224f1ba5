-- claim: pop ready jobs in the given priority order and lease them to a consumer.
-- KEYS[1] jobs hash   KEYS[2] inflight zset   KEYS[3..] ready lists, in the order to try
-- ARGV[1] most jobs to claim   ARGV[2] lease ms
-- Returns a flat list {tid, payload, tid, payload, ...} and, last, the shard now ms.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local want = tonumber(ARGV[1])
local deadline = now + tonumber(ARGV[2])
local out = {}
for i = 3, #KEYS do
  while want > 0 do
    local entries = redis.call('LPOP', KEYS[i], want)
    if not entries then break end
    for _, e in ipairs(entries) do
      local sep = string.find(e, '|', 1, true)
      if sep then
        local v = string.sub(e, 1, sep - 1)
        local tid = string.sub(e, sep + 1)
        local payload = redis.call('HGET', KEYS[1], tid)
        -- Skip entries whose job was deleted or replaced after it became ready.
        if payload and job_vp(payload) == v then
          redis.call('ZADD', KEYS[2], deadline, tid)
          out[#out + 1] = tid
          out[#out + 1] = payload
          want = want - 1
        end
      end
    end
  end
end
out[#out + 1] = tostring(now)
return out
