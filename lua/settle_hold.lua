-- An order's hold ends, in one atomic step with the stock movement it stands for, once per order and step:
--   STOCK_RESERVED:              step 'decided',   release the hold, lower stock:  (stock - reserved unchanged)
--   STOCK_FAILED, PAYMENT_FAILED: step 'decided',   release the hold, stock unchanged
--   STOCK_RELEASED (restock):     step 'restocked', no hold,          raise stock:
-- So stock - reserved never counts a sold unit as free while an order is in flight. A stock: key that is not
-- cached stays uncached (the next cart add loads it from PostgreSQL).
-- KEYS[1] = pulse:hold:{orderId}, KEYS[1 + i] = reserved:{productId_i}, KEYS[1 + n + i] = stock:{productId_i}
-- ARGV[1] = step, ARGV[2] = '1' to release the hold, ARGV[3] = stock direction (-1, 0, 1),
-- ARGV[4] = seconds to remember the order, ARGV[4 + i] = quantity of product i
-- Returns 1 when applied now, 0 when this step of this order was applied before.
if redis.call('HSETNX', KEYS[1], ARGV[1], '1') == 0 then
    return 0
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
local n = #ARGV - 4
local release = ARGV[2] == '1' and redis.call('HSETNX', KEYS[1], 'released', '1') == 1
local direction = tonumber(ARGV[3])
for i = 1, n do
    local qty = tonumber(ARGV[4 + i])
    if release and redis.call('DECRBY', KEYS[1 + i], qty) < 0 then
        redis.call('SET', KEYS[1 + i], '0')
    end
    local stock = KEYS[1 + n + i]
    if direction ~= 0 and redis.call('EXISTS', stock) == 1 then
        if redis.call('INCRBY', stock, direction * qty) < 0 then
            redis.call('SET', stock, '0')
        end
    end
end
return 1
