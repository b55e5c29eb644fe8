-- First terminal write wins: a job already done, failed or cancelled is left as it is (a
-- duplicate delivery, or a cancellation while it ran), and this result is discarded.
-- ARGV: group, entry, 'done' | 'failed', now, ttl, reason, media type, result bytes.
local entry, target, now, ttl = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local state = redis.call('HGET', job, 'state')
if not state or TERMINAL[state] then
  drop_entry(entry)
  return {'lost'}
end
if target == 'done' then
  redis.call('SET', result, ARGV[8], 'EX', ttl)
  redis.call('HSET', job, 'media_type', ARGV[7], 'reason', '')
else
  redis.call('HSET', job, 'reason', ARGV[6])
end
redis.call('HSET', job, 'state', target, 'updated_at', now)
finalize(ttl)
drop_entry(entry)
return {'ok', redis.call('HGETALL', job)}
