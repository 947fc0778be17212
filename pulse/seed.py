"""The seed catalogue (``pulse db seed``): five products with fixed ids, so the demo, the notebooks and the tests
can name them. Ids are the only copy: import them from here."""

IPHONE = "e0e0e0e0-e0e0-4e0e-a0e0-000000000001"
AIRPODS = "e0e0e0e0-e0e0-4e0e-a0e0-000000000002"
MACBOOK = "e0e0e0e0-e0e0-4e0e-a0e0-000000000003"
KINDLE = "e0e0e0e0-e0e0-4e0e-a0e0-000000000004"
KEYBOARD = "e0e0e0e0-e0e0-4e0e-a0e0-000000000005"  # stock 0: always sold out

# (id, name, base price, stock)
SEED_PRODUCTS = [
    (IPHONE, "iPhone 15 Pro", "999.00", 50),
    (AIRPODS, "AirPods Pro 2", "249.00", 120),
    (MACBOOK, "MacBook Air M3", "1299.00", 15),
    (KINDLE, "Kindle Paperwhite", "139.00", 200),
    (KEYBOARD, "Mechanical Keyboard", "150.00", 0),
]
