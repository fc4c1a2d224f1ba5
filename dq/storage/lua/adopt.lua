-- adopt: move jobs php-delayqueue left on this shard, in its own layout, into dq's (see
-- dq/storage/adopt.py). A job's entry in the original's ready list or bucket, its body there and
-- its write here are one step, so each job moves once however many adopters run at once;
-- one that changed since the caller read it is left for the next pass.
-- KEYS[1] the original's job hash (tid -> body JSON)
-- KEYS[2] the source: one of the original's ready lists (mode 'ready'), one of its bucket
--         zsets ('bucket'), or its job hash again ('orphan': bodies in none of its lists)
-- KEYS[3] jobs hash   KEYS[4] guests set
-- KEYS[5 .. 4 + ARGV[2]] the original's bucket zsets ('orphan': a job in one is no orphan)
-- then per job: delay zset (the tid's bucket), wake list of that bucket
-- ARGV[1] mode 'ready' | 'bucket' | 'orphan'   ARGV[2] how many bucket zsets follow KEYS[4]
-- then per job: tid, its body as read ('' = none), its bucket score as read ('bucket': due
-- epoch s, else ''), version, priority, attempt, set ms, and whose it is: 0 this shard's,
-- 1 a guest (its owner is another shard), 2 its owner holds it already (added through dq)
-- 'ready': the jobs are the list's head, in order; when the head differs (another adopter
-- took them) or a body changed, nothing is done.
-- Returns {adopted, superseded (dq holds the job already: it wins, the original's copy is
-- dropped), gone (no body: the entry is dropped, as the original's consumer skips it),
-- changed (written again since it was read: left for the next pass), raced (another
-- adopter took it, or for an orphan: it is in a bucket still)}.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local mode, nchecks = ARGV[1], tonumber(ARGV[2])
local first = 5 + nchecks
local n = (#ARGV - 2) / 8
local counts = {0, 0, 0, 0, 0}
local function hex(v)
  if v < 0 then return '-' .. string.format('%x', -v) end
  return string.format('%x', v)
end
if mode == 'ready' then
  local head = redis.call('LRANGE', KEYS[2], 0, n - 1)
  for j = 0, n - 1 do
    local a = 3 + 8 * j
    if head[j + 1] ~= ARGV[a] then return {0, 0, 0, 0, n} end
  end
  for j = 0, n - 1 do
    local a = 3 + 8 * j
    if (redis.call('HGET', KEYS[1], ARGV[a]) or '') ~= ARGV[a + 1] then
      return {0, 0, 0, n, 0}
    end
  end
  redis.call('LTRIM', KEYS[2], n, -1)
end
for j = 0, n - 1 do
  local a, k = 3 + 8 * j, first + 2 * j
  local tid, read = ARGV[a], ARGV[a + 1]
  local body = redis.call('HGET', KEYS[1], tid)
  local due = now
  local take = true
  if mode == 'bucket' then
    local score = redis.call('ZSCORE', KEYS[2], tid)
    if not score then
      take = false
      counts[5] = counts[5] + 1
    elseif tonumber(score) ~= tonumber(ARGV[a + 2]) then
      take = false
      counts[4] = counts[4] + 1
    elseif body and body ~= read then
      take = false  -- written again since it was read (the original still runs?)
      counts[4] = counts[4] + 1
    else
      redis.call('ZREM', KEYS[2], tid)
      due = math.floor(tonumber(score) * 1000)
    end
  elseif mode == 'orphan' then
    if body ~= read then
      take = false
      counts[body and 4 or 5] = counts[body and 4 or 5] + 1
    else
      for i = 5, 4 + nchecks do
        if redis.call('ZSCORE', KEYS[i], tid) then take = false end
      end
      if not take then counts[5] = counts[5] + 1 end
    end
  end
  if take then
    if not body then
      counts[3] = counts[3] + 1
    else
      redis.call('HDEL', KEYS[1], tid)
      if ARGV[a + 7] == '2' or redis.call('HEXISTS', KEYS[3], tid) == 1 then
        counts[2] = counts[2] + 1
      else
        local payload = ARGV[a + 3] .. '|' .. ARGV[a + 4] .. '|' .. ARGV[a + 5] .. '|' ..
          hex(due) .. '|' .. hex(due - tonumber(ARGV[a + 6])) .. '|' .. body
        redis.call('HSET', KEYS[3], tid, payload)
        redis.call('ZADD', KEYS[k], due, tid)
        wake_if_first(KEYS[k], KEYS[k + 1], tid)
        if ARGV[a + 7] == '1' then redis.call('SADD', KEYS[4], tid) end
        counts[1] = counts[1] + 1
      end
    end
  end
end
return counts
