-- ORDER_CREATED: the ordered units leave the user's cart and their hold moves from the cart to the order,
-- so reserved:{productId} does not change. Once per order (not per event): a re-driven ORDER_CREATED
-- carries a new event id and must not take the units out of a newer cart again.
-- KEYS[1] = cart:{userId}, KEYS[2] = cart:cleanup:queue, KEYS[3] = pulse:hold:{orderId},
-- KEYS[3 + i] = reserved:{productId_i}
-- ARGV[1] = userId, ARGV[2] = seconds to remember the order, ARGV[3] = '1' to release the hold now (the lab's
-- naive release-on-order-created), ARGV[3 + i] = ordered quantity of product i
-- Returns 1 when moved now, 0 when this order's hold had been moved already.
if redis.call('HSETNX', KEYS[3], 'moved', '1') == 0 then
    return 0
end
redis.call('EXPIRE', KEYS[3], ARGV[2])
local release = ARGV[3] == '1' and redis.call('HSETNX', KEYS[3], 'released', '1') == 1
for i = 4, #KEYS do
    local productId = string.sub(KEYS[i], 10)  -- after 'reserved:'
    local qty = tonumber(ARGV[i])
    local inCart = tonumber(redis.call('HGET', KEYS[1], productId) or '0')
    if inCart <= qty then
        redis.call('HDEL', KEYS[1], productId)  -- items added after the order stay; nothing goes below zero
    else
        redis.call('HINCRBY', KEYS[1], productId, -qty)
    end
    if release and redis.call('DECRBY', KEYS[i], qty) < 0 then
        redis.call('SET', KEYS[i], '0')
    end
end
if redis.call('HLEN', KEYS[1]) == 0 then
    redis.call('DEL', KEYS[1])
    redis.call('ZREM', KEYS[2], ARGV[1])
end
return 1
