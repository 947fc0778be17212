-- Reserve ARGV[1] units of one product for a cart, atomically.
-- KEYS[1] = stock:{productId}    cached available stock (loaded from PostgreSQL on a miss)
-- KEYS[2] = reserved:{productId} units held by carts and by orders inventory has not decided yet
-- Optional, to record the hold in the cart in the same atomic step (so a crash cannot leave reserved:
-- raised with no cart that reconciliation would ever look at):
-- KEYS[3] = cart:{userId}, KEYS[4] = cart:cleanup:queue; ARGV[2] = productId, ARGV[3] = userId,
-- ARGV[4] = the cart's expiry (epoch ms)
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
if KEYS[3] then
    redis.call('HINCRBY', KEYS[3], ARGV[2], qty)
    redis.call('ZADD', KEYS[4], ARGV[4], ARGV[3])
end
return 1
