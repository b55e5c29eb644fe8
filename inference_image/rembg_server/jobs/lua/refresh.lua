-- Heartbeat of a running job: reset the entry's idle time if this consumer still holds it.
-- Answers 'running', or why to stop: 'cancelled' (or another state), 'lost', 'gone'.
-- ARGV: group, entry, consumer.
local entry, consumer = ARGV[2], ARGV[3]
local state, current = unpack(redis.call('HMGET', job, 'state', 'entry'))
if not state then
  return 'gone'
end
if state ~= 'running' then
  return state
end
if current ~= entry or owner_of(entry) ~= consumer then
  return 'lost'
end
redis.call('XCLAIM', stream, group, consumer, 0, entry, 'JUSTID')
return 'running'
