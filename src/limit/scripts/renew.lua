-- Renew one holder's lease of a concurrency limit, only while it is live.
-- KEYS[1]: the limited key (sorted set: holder token -> lease expiry, server milliseconds).
-- ARGV[1]: the holder token.
-- ARGV[2]: the lease, in milliseconds.
-- Returns 1 when renewed, 0 when the holder is gone or its lease has expired: an expired lease
-- is never revived, since its slot may already be someone else's.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) <= now then
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], last[2])
return 1
