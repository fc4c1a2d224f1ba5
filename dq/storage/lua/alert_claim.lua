-- alert_claim: the dead letters whose alert mail is owed and due (their burying consumer
-- did not get it out: it died, was stopped, or the mail server failed), each claimed for a
-- while so that one sender mails it; the sender clears it once mailed (ZREM).
-- KEYS[1] alerts zset (tid -> when a sender may try it)
-- ARGV[1] most to claim   ARGV[2] ms a claim lasts (then it is tried again)
-- Returns the claimed tids.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, tid in ipairs(due) do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), tid)
end
return due
