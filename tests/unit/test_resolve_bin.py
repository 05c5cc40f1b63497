"""ResolveBin's answers from the node's BIN table (docs/bins.md), pure: a prefix gets the range every
number with it gets, FAILED_PRECONDITION where they are split (it answered the first number's range: a
whole BIN went to its first sub-range), and UNAVAILABLE while no poll has read which table is active (a
switch takes NOT_FOUND as final; the database was out since the node started)."""

from __future__ import annotations

import pytest

from server.bins import EMPTY, BinRow, BinTable, build
from server.caller import Caller
from server.crypto import Keyring, new_key
from server.decisions import DEFAULT_NETWORK_CODES, DecisionTable, parse_network_codes
from server.errors import BackendUnavailable, CrsError, FailedPrecondition, NotFound
from server.lookup import LookupHandlers
from server.proto import crs_pb2 as pb
from server.store.read_route import Read

TABLE = build([BinRow("453201", "453201", 16, "visa", "Issuer", "GB", "credit", False),
               BinRow("45320100", "45320100", 16, "mastercard", "Tiny Co-brand", "GB", "credit", False)], 3)
CALLER = Caller("switch", frozenset({"lookup:card"}), "mtls")


class Bins:
    def __init__(self, table: BinTable, known: bool) -> None:
        self.table, self.known = table, known

    def cacheable(self, load: Read) -> Read:
        return load


class _Near:
    enabled = False


class _Resolver:
    near = _Near()


def _handlers(bins: Bins) -> LookupHandlers:
    return LookupHandlers(resolver=_Resolver(), keyring=Keyring(fingerprint_keys={1: new_key()},  # type: ignore[arg-type]
                                                                fingerprint_version=1, kek=new_key()),
                          pg_timeout=2, batch_max=10, bins=bins, card_answer_life=330,
                          decisions=DecisionTable(parse_network_codes(DEFAULT_NETWORK_CODES)))


def _resolve(handlers: LookupHandlers, prefix: str) -> pb.BinRange:
    return pb.BinRange.FromString(handlers.resolve_bin_now(pb.ResolveBinRequest(prefix=prefix), CALLER))


def test_a_prefix_gets_the_range_of_all_its_numbers_or_is_told_it_is_split() -> None:
    handlers = _handlers(Bins(TABLE, known=True))
    assert _resolve(handlers, "45320101").issuer_name == "Issuer"
    assert _resolve(handlers, "45320100").issuer_name == "Tiny Co-brand"
    with pytest.raises(FailedPrecondition, match="more than one BIN range"):
        _resolve(handlers, "453201")
    with pytest.raises(NotFound, match="no BIN range holds"):
        _resolve(handlers, "453202")


@pytest.mark.parametrize(("known", "error"), [(False, BackendUnavailable), (True, NotFound)])
def test_no_table_yet_is_unavailable_until_a_poll_says_none_is_active(known: bool, error: type[CrsError]) -> None:
    with pytest.raises(error):
        _resolve(_handlers(Bins(EMPTY, known=known)), "453201")
