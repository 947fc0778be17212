-- Clear a user's cart after its order was created, releasing its reservations, at most once per event.
-- KEYS[1] = cart:{userId}, KEYS[2] = cart:cleanup:queue, KEYS[3] = pulse:applied:{eventId}
-- ARGV[1] = userId, ARGV[2] = seconds to remember the event id
-- Returns 1 when cleared now, 0 when this event had already cleared it (a redelivery).
if redis.call('SET', KEYS[3], '1', 'NX', 'EX', ARGV[2]) == false then
    return 0
end
local items = redis.call('HGETALL', KEYS[1])
for i = 1, #items, 2 do
    local reservedKey = 'reserved:' .. items[i]
    if redis.call('DECRBY', reservedKey, items[i + 1]) < 0 then
        redis.call('SET', reservedKey, '0')
    end
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
