-- DELETE /v1/jobs/{id}: a queued or running job becomes cancelled (its entry and input go;
-- a running worker notices at its next heartbeat); a terminal job is deleted outright.
-- ARGV: group, now, ttl.
local state = redis.call('HGET', job, 'state')
if not state then
  return {'gone'}
end
if TERMINAL[state] then
  redis.call('DEL', job, input, result)
  return {'deleted'}
end
redis.call('HSET', job, 'state', 'cancelled', 'updated_at', ARGV[2],
  'reason', 'cancelled by the client')
finalize(ARGV[3])
return {'cancelled', redis.call('HGETALL', job)}
