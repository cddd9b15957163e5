-- A background batch: settlements (ARGV[1]) and SETs (ARGV[2]) that no admission carried.
-- Returns the settle alerts.
write(ARGV[2])
return settle(ARGV[1])
