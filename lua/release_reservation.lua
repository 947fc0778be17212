-- Give back units held by a cart for several products at once, never below zero.
-- KEYS = reserved:{productId}..., ARGV = quantities in the same order. Returns the number of keys touched.
for i, key in ipairs(KEYS) do
    local left = redis.call('DECRBY', key, ARGV[i])
    if left < 0 then
        redis.call('SET', key, '0')
    end
end
return #KEYS
