return settle(ARGV[1])
