-- Backlog for the metrics: XLEN and the age (ms, by the server's clock) of the oldest entry
-- not yet delivered to any worker; also forgets consumers idle past ARGV[2] ms that hold
-- nothing (workers of replaced pods; a live one is re-created by its next read).
-- ARGV: group, consumer idle limit ms.
local length = redis.call('XLEN', stream)
local groups = redis.pcall('XINFO', 'GROUPS', stream)
local delivered = '0-0'
if type(groups) == 'table' and not groups.err then
  for _, info in ipairs(groups) do
    local fields = {}
    for index = 1, #info, 2 do
      fields[info[index]] = info[index + 1]
    end
    if fields['name'] == group then
      delivered = fields['last-delivered-id']
    end
  end
  local consumers = redis.pcall('XINFO', 'CONSUMERS', stream, group)
  if type(consumers) == 'table' and not consumers.err then
    for _, info in ipairs(consumers) do
      local fields = {}
      for index = 1, #info, 2 do
        fields[info[index]] = info[index + 1]
      end
      if fields['pending'] == 0 and fields['idle'] > tonumber(ARGV[2]) then
        redis.call('XGROUP', 'DELCONSUMER', stream, group, fields['name'])
      end
    end
  end
end
local oldest = redis.call('XRANGE', stream, '(' .. delivered, '+', 'COUNT', 1)
if #oldest == 0 then
  return {length, 0}
end
local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local entry_ms = tonumber(string.match(oldest[1][1], '^(%d+)'))
return {length, math.max(0, now_ms - entry_ms)}
