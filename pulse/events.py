"""Event types, their typed payloads, and the wire envelope shared by every module (SPEC §2).

Each event type has one frozen dataclass. Its attributes are the payload's fields, named once: the JSON key is
the attribute in camelCase (``total_price`` → ``totalPrice``), and this module alone turns an event into its
payload (:meth:`Payload.to_payload`) and back (:meth:`Payload.from_payload`, or :func:`parse`). Values travel
as today: ids as strings, money as decimal strings, times as ISO 8601, statuses as their SPEC words.

A field without a default is required: a payload that lacks it is malformed (:class:`MalformedEnvelope`), and
it is always written, as ``null`` if its type allows None. A field whose default is None is optional: it is
left out of the payload while None, as the handlers always did for ``shortages``, ``redriven`` or
``redriveFor``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import functools
import types
import typing
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any, ClassVar, Self, TypeVar

import orjson

from pulse.status import FailureReason, InventoryStatus, OrderStatus, PaymentStatus, Strategy


# Not enum.StrEnum: its str() and f-strings give the value, these give 'EventType.X' (orders.model's error
# message shows one); JSON, psycopg and equality with the wire's strings are the same for both.
class EventType(str, enum.Enum):  # noqa: UP042
    ORDER_CREATED = "ORDER_CREATED"
    ORDER_UPDATED = "ORDER_UPDATED"
    STOCK_RESERVED = "STOCK_RESERVED"
    STOCK_RELEASED = "STOCK_RELEASED"
    STOCK_FAILED = "STOCK_FAILED"
    PAYMENT_PROCESSED = "PAYMENT_PROCESSED"
    PAYMENT_FAILED = "PAYMENT_FAILED"
    PAYMENT_REFUNDED = "PAYMENT_REFUNDED"


class MalformedEnvelope(ValueError):
    """A message body that is not a SPEC envelope, or a payload that is not its event type's; it goes to the
    dead-letter queue at once, since no retry can make it parse."""


# ----- typed payloads ------------------------------------------------------------------------------------


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _text(value: object) -> str:
    if isinstance(value, (str, uuid.UUID)):
        return str(value)
    raise TypeError(f"expected a string, got {type(value).__name__}")


def _decimal(value: object) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (str, int, float, Decimal)):
        raise TypeError(f"expected a decimal string, got {type(value).__name__}")
    try:
        return value if isinstance(value, Decimal) else Decimal(str(value))
    except decimal.InvalidOperation:
        raise ValueError(f"{value!r} is not a decimal number") from None


def _integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {type(value).__name__}")
    return value


def _time(value: object) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value
    if isinstance(value, str):
        return dt.datetime.fromisoformat(value)
    raise TypeError(f"expected an ISO 8601 time, got {type(value).__name__}")


Coerce = typing.Callable[[Any], Any]


def _codec(hint: Any) -> tuple[Coerce, Coerce]:
    """(coerce, dump) for one annotated type: coerce checks and normalises a value given in code or read from
    JSON; dump gives the JSON value."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # ``X | None``: None passes through
        coerce, dump = _codec(next(a for a in args if a is not type(None)))
        return (lambda v: None if v is None else coerce(v)), (lambda v: None if v is None else dump(v))
    if typing.get_origin(hint) is tuple:  # ``tuple[Item, ...]``: a JSON list of nested payloads
        part = args[0]

        def coerce_all(v: object) -> tuple[Any, ...]:
            if not isinstance(v, (list, tuple)):
                raise TypeError(f"expected a list, got {type(v).__name__}")
            return tuple(x if isinstance(x, part) else part.from_payload(x) for x in v)

        return coerce_all, (lambda v: [x.to_payload() for x in v])
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint, str
    if isinstance(hint, type) and issubclass(hint, Payload):
        return (lambda v: v if isinstance(v, hint) else hint.from_payload(v)), (lambda v: v.to_payload())
    scalars: dict[type, tuple[Coerce, Coerce]] = {
        str: (_text, str),
        Decimal: (_decimal, str),
        int: (_integer, int),
        bool: (_flag, bool),
        dt.datetime: (_time, dt.datetime.isoformat),
    }
    return scalars[hint]


def _exact(hint: Any) -> tuple[type | None, ...]:
    """The types whose values ``_codec(hint)``'s coerce returns unchanged (None for ``X | None``); empty when every
    value must go through coerce (a tuple of nested payloads is rebuilt)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = _exact(next(a for a in typing.get_args(hint) if a is not type(None)))
        return (None, *inner) if inner else ()
    return () if typing.get_origin(hint) is tuple else (hint,)


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    key: str
    required: bool
    omit_none: bool
    coerce: Coerce
    dump: Coerce
    exact: tuple[type | None, ...]
    default: Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class Payload:
    """A JSON object of the wire with typed fields (see the module docstring for the rules)."""

    @classmethod
    @functools.cache
    def _fields(cls) -> tuple[_Field, ...]:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            if f.default_factory is not dataclasses.MISSING:
                raise TypeError(f"{cls.__name__}.{f.name}: a payload field takes a default value, not a factory")
            coerce, dump = _codec(hints[f.name])
            required = f.default is dataclasses.MISSING
            out.append(
                _Field(
                    f.name,
                    _camel(f.name),
                    required,
                    not required and f.default is None,
                    coerce,
                    dump,
                    _exact(hints[f.name]),
                    f.default,
                )
            )
        return tuple(out)

    def __post_init__(self) -> None:
        cls = type(self)
        (_CHECKS.get(cls) or _compile(cls)[0])(self)

    def _coerce(self, f: _Field) -> None:
        try:
            value = f.coerce(getattr(self, f.name))
        except (TypeError, ValueError) as exc:
            raise MalformedEnvelope(f"{self._what()}: {f.key}: {exc}") from None
        object.__setattr__(self, f.name, value)

    @classmethod
    def _what(cls) -> str:
        kind = getattr(cls, "TYPE", None)
        return f"malformed {kind.value if kind else cls.__name__} payload"

    def to_payload(self) -> dict[str, Any]:
        """The JSON object (plain JSON values only) that travels as this event's payload."""
        out = {}
        for f in self._fields():
            value = getattr(self, f.name)
            if value is None and f.omit_none:
                continue
            out[f.key] = f.dump(value)
        return out

    @classmethod
    def from_payload(cls, payload: object) -> Self:
        """The event of this payload; unknown keys are ignored, a missing or ill-typed field is malformed."""
        event: Self = (_PARSERS.get(cls) or _compile(cls)[1])(cls, payload)
        return event

    @classmethod
    def _from_payload(cls, payload: object) -> Self:
        if not isinstance(payload, dict):
            raise MalformedEnvelope(f"{cls._what()}: expected a JSON object, got {type(payload).__name__}")
        missing = [f.key for f in cls._fields() if f.required and f.key not in payload]
        if missing:
            raise MalformedEnvelope(f"{cls._what()}: missing {', '.join(map(repr, missing))}")
        return cls(**{f.name: payload[f.key] for f in cls._fields() if f.key in payload})


# Every delivery parses its payload and every handler builds the next event: the per-field loops above, run as
# written, were an eighth of the consumers' Python time (py-spy, bench/NOTES.md). So each class gets its own
# check and parser, generated once from its fields as dataclasses generates __init__. They take the general path
# above for anything that is not already plainly right: a value of another type, a missing key, not a dict.
_CHECKS: dict[type, Callable[[Any], None]] = {}
_PARSERS: dict[type, Callable[[Any, object], Any]] = {}


def _compile(cls: type[Payload]) -> tuple[Callable[[Any], None], Callable[[Any, object], Any]]:
    fields = cls._fields()
    names: dict[str, Any] = {"_general": cls._from_payload, "_new": object.__new__}
    check = ["def check(self):"]
    for i, f in enumerate(fields):
        names[f"f{i}"] = f
        tests = ["v is not None" if t is None else f"type(v) is not t{i}_{j}" for j, t in enumerate(f.exact)]
        names.update({f"t{i}_{j}": t for j, t in enumerate(f.exact) if t is not None})
        check.append(f"    v = self.{f.name}")
        check.append(f"    if {' and '.join(tests)}: self._coerce(f{i})" if tests else f"    self._coerce(f{i})")
    required = " and ".join(f"{f.key!r} in p" for f in fields if f.required) or "True"
    args = []
    for i, f in enumerate(fields):
        if f.required:
            args.append(f"{f.name}=p[{f.key!r}]")
        else:
            names[f"d{i}"] = f.default  # absent key: the field's default, as the general path leaves it out
            args.append(f"{f.name}=p.get({f.key!r}, d{i})")
    parse = [
        "def parse(cls, p):",
        f"    if not isinstance(p, dict) or not ({required}):",
        "        return _general(p)",
        # What the dataclass __init__ does (set each field, then __post_init__'s check), minus its per-field
        # object.__setattr__ calls: a frozen dataclass's instance dict may be filled directly.
        "    self = _new(cls)",
        f"    self.__dict__.update({', '.join(args)})",
        "    check(self)",
        "    return self",
    ]
    exec("\n".join(check + [""] + parse), names)  # the source is built above from the class's own fields
    _CHECKS[cls], _PARSERS[cls] = names["check"], names["parse"]
    return names["check"], names["parse"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Item(Payload):
    """One ordered line: ``{productId, quantity}``."""

    product_id: str
    quantity: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Shortage(Payload):
    """Why a reservation failed, per product: ``{productId, requested, available}``."""

    product_id: str
    requested: int
    available: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Event(Payload):
    """What every saga event carries: its order, the order's strategy, and a watchdog's re-drive marks
    (``redriveFor`` names the one queue whose module should act on it, see topology.Dispatcher)."""

    TYPE: ClassVar[EventType]

    order_id: str
    strategy: Strategy
    redriven: bool | None = None
    redrive_for: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class _OrderStep(Event):
    """A step that carries the whole order forward: the next module needs its user, total and items."""

    user_id: str
    total_price: Decimal
    items: tuple[Item, ...]

    def follow(self, cls: type[_Step], **fields: Any) -> _Step:
        """The next step of this order's saga: carries the order (not this event's re-drive marks)."""
        return cls(
            order_id=self.order_id,
            user_id=self.user_id,
            strategy=self.strategy,
            total_price=self.total_price,
            items=self.items,
            **fields,
        )


_Step = TypeVar("_Step", bound=_OrderStep)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OrderCreated(_OrderStep):
    TYPE = EventType.ORDER_CREATED


@dataclasses.dataclass(frozen=True, kw_only=True)
class StockReserved(_OrderStep):
    TYPE = EventType.STOCK_RESERVED


@dataclasses.dataclass(frozen=True, kw_only=True)
class StockFailed(_OrderStep):
    TYPE = EventType.STOCK_FAILED
    reason: str = FailureReason.OUT_OF_STOCK
    shortages: tuple[Shortage, ...] | None = None  # absent from a watchdog's re-drive: it does not know them


@dataclasses.dataclass(frozen=True, kw_only=True)
class PaymentProcessed(_OrderStep):
    TYPE = EventType.PAYMENT_PROCESSED
    payment_id: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class PaymentFailed(_OrderStep):
    TYPE = EventType.PAYMENT_FAILED
    reason: str = PaymentStatus.DECLINED


@dataclasses.dataclass(frozen=True, kw_only=True)
class StockReleased(Event):
    """The restock after a declined payment: the items are what was reserved. Inventory's own event has no
    total; a watchdog's re-drive carries it."""

    TYPE = EventType.STOCK_RELEASED
    items: tuple[Item, ...]
    user_id: str | None = None
    total_price: Decimal | None = None
    reason: str = FailureReason.PAYMENT_FAILED


@dataclasses.dataclass(frozen=True, kw_only=True)
class PaymentRefunded(Event):
    """The refund after an out-of-stock (post-payment). Payment's own event has no items; a watchdog's re-drive
    carries them."""

    TYPE = EventType.PAYMENT_REFUNDED
    payment_id: str
    user_id: str | None = None
    total_price: Decimal | None = None
    items: tuple[Item, ...] | None = None
    reason: str = FailureReason.OUT_OF_STOCK


@dataclasses.dataclass(frozen=True, kw_only=True)
class OrderUpdated(Event):
    """The order's state after a change: enough for the view to compute its status and drop stale updates."""

    TYPE = EventType.ORDER_UPDATED
    user_id: str
    status: OrderStatus
    payment_status: PaymentStatus
    inventory_status: InventoryStatus
    failure_reason: FailureReason | None
    total_amount: Decimal
    updated_at: dt.datetime


EVENTS: dict[str, type[Event]] = {
    cls.TYPE.value: cls
    for cls in (
        OrderCreated,
        OrderUpdated,
        StockReserved,
        StockReleased,
        StockFailed,
        PaymentProcessed,
        PaymentFailed,
        PaymentRefunded,
    )
}


def parse(event_type: str, payload: object) -> Event:
    """The typed event of a payload of ``event_type``; :class:`MalformedEnvelope` if it is not one."""
    cls = EVENTS.get(str(getattr(event_type, "value", event_type)))
    if cls is None:
        raise MalformedEnvelope(f"unknown event type {event_type!r}")
    return cls.from_payload(payload)


# ----- the wire envelope ---------------------------------------------------------------------------------

# The payload keys an envelope is routed by, spelled once (every delivery reads them, some several times).
_STRATEGY, _REDRIVE_FOR, _ORDER_ID = _camel("strategy"), _camel("redrive_for"), _camel("order_id")


@dataclasses.dataclass(frozen=True)
class Envelope:
    """What travels on the broker: ``id`` is the outbox row id and the inboxes' dedup key."""

    id: uuid.UUID
    event_type: str
    aggregate_id: str
    payload: dict[str, Any]

    @classmethod
    def of(cls, event: Event, id: uuid.UUID | None = None) -> Envelope:
        """The envelope that carries ``event`` (a fresh id unless one is given)."""
        return cls(
            id=id or uuid.uuid4(), event_type=event.TYPE.value, aggregate_id=event.order_id, payload=event.to_payload()
        )

    @functools.cached_property
    def event(self) -> Event:
        """The typed payload, parsed on first use (MalformedEnvelope if it is not its type's)."""
        return parse(self.event_type, self.payload)

    # Read before parsing, to route: an event no module here acts on is dropped unparsed.
    # Raw JSON values, not validated until the payload is parsed.
    @property
    def strategy(self) -> Any:
        return self.payload.get(_STRATEGY)

    @property
    def redrive_for(self) -> Any:
        return self.payload.get(_REDRIVE_FOR)

    @property
    def order_id(self) -> str:
        return str(self.payload.get(_ORDER_ID) or self.aggregate_id)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "id": str(self.id),
                "eventType": self.event_type,
                "aggregateId": self.aggregate_id,
                "payload": self.payload,
            },
            default=_json_default,
        )

    @classmethod
    def from_json(cls, body: bytes) -> Envelope:
        try:
            raw = orjson.loads(body)
            return cls(
                id=uuid.UUID(raw["id"]),
                event_type=str(raw["eventType"]),
                aggregate_id=str(raw["aggregateId"]),
                payload=dict(raw["payload"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise MalformedEnvelope(f"not an event envelope: {exc}") from exc


def _json_default(value: object) -> object:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def dumps(payload: object) -> str:
    """JSON for payloads (and the jsonb columns that copy them): Decimals as strings so money never turns into
    binary floats."""
    return orjson.dumps(payload, default=_json_default).decode()


def loads(text: str | bytes) -> Any:
    """The JSON value of ``text`` (a payload read back from the outbox): orjson.JSONDecodeError is a ValueError."""
    return orjson.loads(text)
