-- Sweep every cart whose expiry (score, epoch ms) in cart:cleanup:queue is <= ARGV[1].
-- For each: give its units back (DECRBY reserved:{productId}, never below 0), delete cart:{userId},
-- and remove its queue entry, all in one atomic step so no cart is half-swept.
-- Returns the number of carts swept.
local now = ARGV[1]
local queue = 'cart:cleanup:queue'
local expired = redis.call('ZRANGEBYSCORE', queue, '-inf', now)
for _, userId in ipairs(expired) do
    local cartKey = 'cart:' .. userId
    local items = redis.call('HGETALL', cartKey)
    for i = 1, #items, 2 do
        local reservedKey = 'reserved:' .. items[i]
        local left = redis.call('DECRBY', reservedKey, items[i + 1])
        if left < 0 then
            -- reserved drifted below the cart (e.g. after a flush); reconciliation restores the truth
            redis.call('SET', reservedKey, '0')
        end
    end
    redis.call('DEL', cartKey)
    redis.call('ZREM', queue, userId)
end
return #expired
