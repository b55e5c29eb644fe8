-- Submit: the hash, the input and the stream entry, all or nothing.
-- ARGV: group, job id, ttl seconds, input bytes, then the hash's field/value pairs.
local fields = {}
for index = 5, #ARGV do
  fields[#fields + 1] = ARGV[index]
end
redis.call('HSET', job, unpack(fields))
local entry = redis.call('XADD', stream, '*', 'id', ARGV[2])
redis.call('HSET', job, 'entry', entry)
redis.call('SET', input, ARGV[4], 'EX', ARGV[3])
redis.call('EXPIRE', job, ARGV[3])
return entry
