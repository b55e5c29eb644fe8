-- Put a running job back in the queue under a new entry (the old one acknowledged and
-- deleted): after a transient error (counted; past max attempts it fails instead) or when a
-- stopping worker hands it back unfinished (not counted). Only the holder may do this.
-- ARGV: group, entry, consumer, now, job id, reason, counted ('1'/'0'), max attempts,
--       result ttl, queued ttl.
local entry, consumer, now = ARGV[2], ARGV[3], ARGV[4]
local state, current = unpack(redis.call('HMGET', job, 'state', 'entry'))
if not state then
  drop_entry(entry)
  return {'lost'}
end
if state ~= 'running' or current ~= entry or owner_of(entry) ~= consumer then
  return {'lost'}
end
if ARGV[7] == '1' then
  local attempts = tonumber(redis.call('HGET', job, 'attempts'))
  if attempts >= tonumber(ARGV[8]) then
    redis.call('HSET', job, 'state', 'failed', 'updated_at', now,
      'reason', gave_up(attempts, ARGV[6]))
    finalize(ARGV[9])
    return {'failed', redis.call('HGETALL', job)}
  end
  redis.call('HSET', job, 'reason', ARGV[6])
else
  redis.call('HINCRBY', job, 'attempts', -1)
end
drop_entry(entry)
local renewed = redis.call('XADD', stream, '*', 'id', ARGV[5])
redis.call('HSET', job, 'state', 'queued', 'entry', renewed, 'updated_at', now, 'consumer', '')
redis.call('EXPIRE', job, ARGV[10])
redis.call('EXPIRE', input, ARGV[10])
return {'queued', redis.call('HGETALL', job)}
