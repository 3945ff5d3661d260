"""The response cache without sockets: keys, freshness, validation and bounds (RFC 7252 5.6)."""

from __future__ import annotations

from aiocoap import FETCH, GET, POST, Message
from aiocoap.numbers import codes
from aiocoap.optiontypes import OpaqueOption, UintOption

from coaplayers.proxy.cache import CacheLimits, ResponseCache, cached_answer
from coaplayers.proxy.config import Upstream
from coaplayers.proxy.routing import Decision

D = Decision("forward", Upstream("coap", "10.0.0.5", 5683), ("s", "t"), (), None, 16)


def req(code=GET, **opts: object) -> Message:  # type: ignore[no-untyped-def]
    return Message(code=code, **opts)  # type: ignore[arg-type]


def answer(payload: bytes = b"v", **opts: object) -> Message:
    return Message(code=codes.CONTENT, payload=payload, **opts)  # type: ignore[arg-type]


def test_key_ignores_what_the_proxy_implements_and_nocachekey_options() -> None:
    base = ResponseCache.key_for(req(), D)
    assert base is not None
    noisy = req(etags=[b"x"], no_response=2)
    noisy.opt.add_option(UintOption(60, 9))  # Size1: NoCacheKey
    noisy.opt.add_option(UintOption(16, 3))  # Hop-Limit: routing
    assert ResponseCache.key_for(noisy, D) == base
    assert ResponseCache.key_for(req(accept=50), D) != base
    elective = req()
    elective.opt.add_option(OpaqueOption(65000, b"a"))  # unknown, safe, in the key
    assert ResponseCache.key_for(elective, D) != base
    assert ResponseCache.key_for(req(code=FETCH, payload=b"a"), D) != ResponseCache.key_for(
        req(code=FETCH, payload=b"b"), D)
    assert ResponseCache.key_for(req(code=POST), D) is None
    assert ResponseCache.key_for(req(observe=0), D) is None
    oscore = req(code=FETCH)
    oscore.opt.add_option(OpaqueOption(9, b"\x09"))
    assert ResponseCache.key_for(oscore, D) is None


def test_freshness_validation_and_etag_answers() -> None:
    cache = ResponseCache()
    key = ResponseCache.key_for(req(), D)
    stored = cache.store(key, answer(max_age=10, etag=b"e"), D.uri, now=100.0)
    assert stored is not None
    hit = cache.lookup(key, 105.5).fresh
    assert hit is stored
    served = cached_answer(hit, req(), 105.5)
    assert (served.code, served.payload, served.opt.max_age, served.opt.etag) == (
        codes.CONTENT, b"v", 4, b"e")
    valid = cached_answer(hit, req(etags=[b"other", b"e"]), 105.5)
    assert (valid.code, valid.payload, valid.opt.etag) == (codes.VALID, b"", b"e")
    found = cache.lookup(key, 110.0)
    assert found.fresh is None and found.stale is stored
    cache.refresh(key, stored, Message(code=codes.VALID, max_age=5), now=110.0)
    assert cache.lookup(key, 114.0).fresh is stored
    # without an ETag a stale entry is simply gone
    cache.store(key, answer(max_age=1), D.uri, now=200.0)
    found = cache.lookup(key, 201.0)
    assert found.fresh is None and found.stale is None and len(cache) == 0


def test_not_stored_and_bounds() -> None:
    cache = ResponseCache(CacheLimits(entries=2, bytes=1000, max_entry_bytes=600))
    key = ResponseCache.key_for(req(), D)
    assert cache.store(key, answer(max_age=0), D.uri, 0.0) is None
    assert cache.store(key, Message(code=codes.CHANGED), D.uri, 0.0) is None
    protected = answer()
    protected.opt.add_option(OpaqueOption(9, b""))
    assert cache.store(key, protected, D.uri, 0.0) is None
    assert cache.store(key, answer(b"x" * 700), D.uri, 0.0) is None  # larger than one entry
    keys = [ResponseCache.key_for(req(accept=n), D) for n in range(3)]
    for k in keys:
        cache.store(k, answer(b"y" * 350), D.uri, 0.0)
    assert len(cache) == 1 and cache.bytes_used <= 1000  # 2 x (350 + overhead) > 1000
    assert cache.lookup(keys[2], 1.0).fresh is not None
    default = cache.store(keys[0], answer(), D.uri, 0.0)
    assert default is not None and default.max_age(0.0) == 60  # RFC 7252 default Max-Age
    dropped = cache.invalidate(req(code=POST), Message(code=codes.CHANGED), D.uri)
    assert dropped == 2 and len(cache) == 0 and cache.bytes_used == 0


def test_blocks_are_cut_from_a_whole_answer_with_its_etag() -> None:
    """RFC 7959 2.4: any block of a cached whole representation, found under the key without
    Block2; a block an upstream cut stays an entry of its own, served as it is."""
    cache = ResponseCache()
    body = bytes(range(100))
    whole_key = ResponseCache.key_for(req(), D)
    first = req(block2=(0, False, 1))
    assert ResponseCache.key_for(first, D) != whole_key  # each block an entry of its own
    assert ResponseCache.key_for(first, D, whole=True) == whole_key
    stored = cache.store(whole_key, answer(body, max_age=30, etag=b"t"), D.uri, now=0.0)
    assert stored is not None and not stored.block
    seen = b""
    for number in range(4):
        block = cached_answer(stored, req(block2=(number, False, 1)), 10.0)
        b = block.opt.block2
        assert (block.code, block.opt.etag, block.opt.max_age) == (codes.CONTENT, b"t", 20)
        assert (b.block_number, b.size, b.more) == (number, 32, number < 3)
        assert block.opt.size2 is None
        seen += block.payload
    assert seen == body
    sized = cached_answer(stored, req(block2=(1, False, 2), size2=0), 10.0)
    assert (sized.payload, sized.opt.size2, sized.opt.block2.more) == (body[64:], 100, False)
    past = cached_answer(stored, req(block2=(2, False, 2)), 10.0)
    assert past.code == codes.BAD_REQUEST
    assert cached_answer(stored, req(block2=(0, False, 1), etags=[b"t"]), 10.0).code == (
        codes.VALID)
    assert cached_answer(stored, req(), 10.0).opt.block2 is None  # no Block2 asked: whole
    cut = cache.store(ResponseCache.key_for(first, D),
                      answer(body[:32], block2=(0, True, 1)), D.uri, now=0.0)
    assert cut is not None and cut.block
    again = cached_answer(cut, req(block2=(0, False, 0)), 10.0)  # as the upstream cut it
    assert again.payload == body[:32] and again.opt.block2.size == 32
