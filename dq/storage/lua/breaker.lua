-- breaker: a topic's circuit breaker, kept on the topic's home shard (Store.breaker_home),
-- so every consumer of every dq instance sees one state. One call per question or outcome:
--   check: may a job be called now?  {'call', failures in a row} closed; {'probe'} open, cooled off, and no
--          probe out: this caller is the probe (for ARGV[4] ms); {'wait', ms} otherwise
--   ok:    a call succeeded: closes an open breaker ({'closed', member}), else resets
--          the failures in a row ({'ok'})
--   fail:  a call failed: counts it in a row; at ARGV[2] opens the breaker ({'opened',
--          member}); a failure while open (the probe's) starts a new cool-off ({'open'})
-- Opening and closing each owe one mail: a member of KEYS[2] (JSON: topic, event, at,
-- fails, error) due for the sweep after ARGV[5] ms; the caller mails it and removes it.
-- KEYS[1] the topic's breaker hash   KEYS[2] breaker mails owed zset
-- ARGV[1] check|ok|fail   ARGV[2] threshold   ARGV[3] cool-off ms   ARGV[4] probe lease ms
-- ARGV[5] mail head start ms   ARGV[6] topic   ARGV[7] the failure's error text
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local op = ARGV[1]
local b = KEYS[1]
local open = redis.call('HGET', b, 'state') == 'open'
local function owe(event, fails)
  local member = cjson.encode({topic = ARGV[6], event = event, at = now, fails = fails,
                               error = ARGV[7]})
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), member)
  return member
end
if op == 'check' then
  if not open then return {'call', tonumber(redis.call('HGET', b, 'fails') or '0')} end
  local until_ms = tonumber(redis.call('HGET', b, 'opened') or '0') + tonumber(ARGV[3])
  if now < until_ms then return {'wait', until_ms - now} end
  local probe = tonumber(redis.call('HGET', b, 'probe') or '0')
  if probe > now then return {'wait', probe - now} end
  redis.call('HSET', b, 'probe', now + tonumber(ARGV[4]))
  return {'probe'}
end
if op == 'ok' then
  if open then
    local fails = tonumber(redis.call('HGET', b, 'fails') or '0')
    redis.call('HSET', b, 'state', 'closed', 'fails', 0, 'probe', 0, 'changed', now)
    redis.call('HINCRBY', b, 'closes', 1)
    return {'closed', owe('close', fails)}
  end
  if redis.call('HGET', b, 'fails') ~= '0' then redis.call('HSET', b, 'fails', 0) end
  return {'ok'}
end
-- fail
local fails = redis.call('HINCRBY', b, 'fails', 1)
if open then
  if tonumber(redis.call('HGET', b, 'probe') or '0') > 0 then
    redis.call('HSET', b, 'opened', now, 'probe', 0)
  end
  return {'open'}
end
if fails >= tonumber(ARGV[2]) then
  redis.call('HSET', b, 'state', 'open', 'opened', now, 'probe', 0, 'changed', now)
  redis.call('HINCRBY', b, 'opens', 1)
  return {'opened', owe('open', fails)}
end
return {'closed'}
