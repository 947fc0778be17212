-- Delete lock:{idempotencyKey} only if it still holds our token: a lock that expired and was
-- taken by another request must not be released by the slow first owner.
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
