-- Appends usage events to the stream KEYS[1], one entry each (as the drain reads them): ARGV[1] is
-- the entry's field, ARGV[2] the events, one a line (their JSON has no raw newline).
-- One command for a batch: redis-py packs and parses a pipeline's commands one by one.
-- Returns how many were added.
local n = 0
for event in string.gmatch(ARGV[2], '[^\n]+') do
  redis.call('XADD', KEYS[1], '*', ARGV[1], event)
  n = n + 1
end
return n
