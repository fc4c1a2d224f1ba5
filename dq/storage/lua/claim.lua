-- claim: pop ready jobs in the given priority order and lease them to a consumer.
-- Flow control (a topic's rate_limit, concurrency and paused, given per call by the
-- consumer, which caches the registry): a job whose topic may not be called now is moved to
-- its topic's held list instead, without a lease and without counting an attempt, so it
-- holds up no other topic's jobs in the shared ready lists; held jobs are claimed first,
-- in order, as soon as their topic allows. The state is per shard, in Redis, so the limits
-- hold across every consumer and dq instance working the shard.
-- KEYS[1] jobs hash   KEYS[2] inflight zset
-- KEYS[3] flow hash: per topic "<topic>|tok" tokens, "<topic>|at" their time (ms),
--         "<topic>|n" calls in flight
-- KEYS[4] flow lease zset: tid -> lease deadline, for the jobs counted in "<topic>|n"
--         (release.lua or requeue_expired.lua frees them)
-- KEYS[5] held set: the topics that may have a held list
-- KEYS[6..5+r] ready lists, in the order to try   then per flow topic: its held list
-- ARGV[1] most jobs to claim   ARGV[2] lease ms   ARGV[3] r (how many ready lists)
-- ARGV[4] most ready entries to move to held lists in this call (bounds its run time)
-- then per flow topic: name, calls per second on this shard (0 = no limit), burst,
-- calls in flight on this shard (0 = no limit), paused 1|0
-- Returns a flat list {tid, payload, tid, payload, ...} and, last, the shard now ms.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local want = tonumber(ARGV[1])
local deadline = now + tonumber(ARGV[2])
local nready = tonumber(ARGV[3])
local spare = tonumber(ARGV[4])
local out = {}
local flow, any = {}, false
local held0 = 6 + nready
local j = 0
for a = 5, #ARGV - 4, 5 do
  flow[ARGV[a]] = {rate = tonumber(ARGV[a + 1]), burst = tonumber(ARGV[a + 2]),
                   cap = tonumber(ARGV[a + 3]), paused = ARGV[a + 4] == '1',
                   held = KEYS[held0 + j]}
  j = j + 1
  any = true
end

-- The topic's state, read once per call and written back at the end when changed.
local function load(name, f)
  if f.n then return end
  local s = redis.call('HMGET', KEYS[3], name .. '|tok', name .. '|at', name .. '|n')
  f.tok = tonumber(s[1]) or f.burst
  f.at = tonumber(s[2]) or now
  f.n = tonumber(s[3]) or 0
end
-- Whether the topic may have one more call now (refilling its tokens).
local function admit(name, f)
  if f.paused then return false end
  if f.cap <= 0 and f.rate <= 0 then return true end
  load(name, f)
  if f.cap > 0 and f.n >= f.cap then return false end
  if f.rate > 0 then
    local tok = f.tok + (now - f.at) * f.rate / 1000
    if tok > f.burst then tok = f.burst end
    f.tok, f.at = tok, now
    if tok < 1 then return false end
  end
  return true
end
local function lease(tid, payload)
  redis.call('ZADD', KEYS[2], deadline, tid)
  out[#out + 1] = tid
  out[#out + 1] = payload
  want = want - 1
end
local function take(f, tid, payload)
  if f.rate > 0 then
    f.tok = f.tok - 1
    f.dirty = true
  end
  if f.cap > 0 then
    -- One slot per tid in the lease zset: a job replaced and claimed again while its first
    -- call runs takes over that slot (the first delivery's release no longer matches), so
    -- "<topic>|n" keeps counting the zset's entries and no slot leaks.
    if redis.call('ZADD', KEYS[4], deadline, tid) == 1 then
      f.n = f.n + 1
      f.dirty = true
    end
  end
  lease(tid, payload)
end
-- The tid and payload of a ready entry "<version>|<tid>", or nil when its job was deleted
-- or replaced after it became ready.
local function job_of(e)
  local sep = string.find(e, '|', 1, true)
  if not sep then return nil end
  local tid = string.sub(e, sep + 1)
  local payload = redis.call('HGET', KEYS[1], tid)
  if payload and job_vp(payload) == string.sub(e, 1, sep - 1) then return tid, payload end
  return nil
end

if any then
  for name, f in pairs(flow) do
    if redis.call('SISMEMBER', KEYS[5], name) == 1 then
      while want > 0 and admit(name, f) do
        local e = redis.call('LPOP', f.held)
        if not e then
          redis.call('SREM', KEYS[5], name)
          break
        end
        local tid, payload = job_of(e)
        if tid then take(f, tid, payload) end
      end
    end
  end
end
for i = 6, 5 + nready do
  while want > 0 do
    local entries = redis.call('LPOP', KEYS[i], want)
    if not entries then break end
    for _, e in ipairs(entries) do
      local tid, payload = job_of(e)
      if tid then
        local name = any and string.match(tid, '^([^:]*)')
        local f = name and flow[name]
        if not f then
          lease(tid, payload)
        elseif admit(name, f) then
          take(f, tid, payload)
        else
          redis.call('RPUSH', f.held, e)
          redis.call('SADD', KEYS[5], name)
          spare = spare - 1
        end
      end
    end
    if spare <= 0 then break end
  end
end
for name, f in pairs(flow) do
  if f.dirty then
    redis.call('HSET', KEYS[3], name .. '|tok', string.format('%.4f', f.tok),
               name .. '|at', string.format('%d', f.at), name .. '|n', string.format('%d', f.n))
  end
end
out[#out + 1] = tostring(now)
return out
