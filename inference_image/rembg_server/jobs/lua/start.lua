-- A worker got `entry` (XREADGROUP, or XAUTOCLAIM from a silent worker): count the attempt and
-- mark the job running, or give up past max attempts, or drop a stale entry.
-- ARGV: group, entry, consumer, now, max attempts, result ttl, reclaimed ('1'/'0'), reason.
local entry, consumer, now = ARGV[2], ARGV[3], ARGV[4]
local max_attempts, ttl = tonumber(ARGV[5]), ARGV[6]
local state, current = unpack(redis.call('HMGET', job, 'state', 'entry'))
if not state or TERMINAL[state] or current ~= entry then
  drop_entry(entry) -- the job expired, ended, or moved to a newer entry
  return {'skip'}
end
if ARGV[7] == '1' then
  redis.call('HSET', job, 'reason', ARGV[8])
end
local attempts = redis.call('HINCRBY', job, 'attempts', 1)
if attempts > max_attempts then
  redis.call('HSET', job, 'state', 'failed', 'attempts', max_attempts, 'updated_at', now,
    'reason', gave_up(max_attempts, redis.call('HGET', job, 'reason')))
  finalize(ttl)
  return {'failed', redis.call('HGETALL', job)}
end
redis.call('HSET', job, 'state', 'running', 'updated_at', now, 'consumer', consumer)
return {'running', redis.call('HGETALL', job), redis.call('GET', input)}
