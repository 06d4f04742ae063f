-- Acquire a slot of a concurrency limit.
-- KEYS[1]: the limited key, a sorted set: member = holder token, score = lease expiry in
--          milliseconds of this server's clock (`TIME`).
-- ARGV[1]: the holder token.
-- ARGV[2]: the limit (at most this many live holders).
-- ARGV[3]: the lease, in milliseconds.
-- Returns {1, 0} when granted (also when the holder already held a live slot: a resent acquire),
-- {0, ms} when at capacity, ms = time until the earliest live lease expires.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Expired holders drop out before anyone is counted.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local mine = redis.call('ZSCORE', KEYS[1], ARGV[1])
if mine or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  -- The key lives as long as its latest lease, so a dead holder leaves nothing behind.
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', KEYS[1], last[2])
  return {1, 0}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, tonumber(first[2]) - now}
