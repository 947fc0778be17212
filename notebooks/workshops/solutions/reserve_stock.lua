-- Reserve ARGV[1] units of one product for a cart, atomically.
-- KEYS[1] = stock:{productId}    cached available stock (loaded from PostgreSQL on a miss)
-- KEYS[2] = reserved:{productId} units already held in carts
-- Returns -1 when the stock is not cached (caller loads it with SET NX and retries),
--          0 when stock - reserved < qty (nothing changes), 1 when reserved was incremented.
local qty = tonumber(ARGV[1])
local stock = redis.call('GET', KEYS[1])
if not stock then
    return -1
end
local reserved = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(stock) - reserved < qty then
    return 0
end
redis.call('INCRBY', KEYS[2], qty)
return 1
