from _typeshed import ReadableBuffer as Buffer

CONSTANTS: dict[str, float | int]

def user_window(
    times: Buffer,
    amounts: Buffer,
    merchant_hashes: Buffer,
    hours: Buffer,
    international: Buffer,
    new_merchant: Buffer,
    t: float,
    amount: float,
    merchant: int,
    is_international: bool,
    hour: int,
    is_new_merchant: float,
    is_new_category: float,
    is_new_country: float,
    intl_changed: float,
    /,
) -> tuple[float, ...]: ...

def merchant_tables(flat: list[bytes], targets: tuple[dict[int, int], ...], /) -> None: ...

def window_sums(
    tx_hours: dict[int, int],
    tx_days: dict[int, int],
    new_hours: dict[int, int],
    new_days: dict[int, int],
    fraud_hours: dict[int, int],
    fraud_days: dict[int, int],
    hour: int,
    /,
) -> list[int]: ...

def counts_tables(blob: bytes, targets: tuple[dict[int, int], dict[int, int], dict[int, int], dict[int, int]], /) -> None: ...

def counts_sums(blob: bytes, hour: int, /) -> list[int]: ...

def find_u32(column: Buffer, key: int, lo: int = ..., hi: int = ..., /) -> int: ...
