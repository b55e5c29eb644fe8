-- Prepended to every job script by store.py. One job per call, always the same keys:
-- KEYS: stream, job hash, input, result; ARGV[1]: the consumer group.
-- States: queued -> running -> done | failed | cancelled (terminal); running -> queued again
-- on a retry. The hash field `entry` names the job's one live stream entry.
local stream, job, input, result = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group = ARGV[1]
local TERMINAL = {done = true, failed = true, cancelled = true}

-- Acknowledge and delete a stream entry, so XLEN counts unfinished jobs only.
local function drop_entry(entry)
  if entry and entry ~= '' then
    redis.call('XACK', stream, group, entry)
    redis.call('XDEL', stream, entry)
  end
end

-- The consumer whose pending list holds `entry`; nil when acknowledged or the group is gone.
local function owner_of(entry)
  local pending = redis.pcall('XPENDING', stream, group, entry, entry, 1)
  if type(pending) ~= 'table' or pending.err or #pending == 0 then
    return nil
  end
  return pending[1][2]
end

-- A terminal state was written: its stream entry and input go, the record expires.
local function finalize(ttl)
  drop_entry(redis.call('HGET', job, 'entry'))
  redis.call('DEL', input)
  redis.call('EXPIRE', job, ttl)
end

local function gave_up(attempts, last)
  if not last or last == '' then
    last = 'no reason recorded'
  end
  return 'gave up after ' .. attempts .. ' attempts: ' .. last
end
