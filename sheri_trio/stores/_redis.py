"""The Redis claim store (``redis://``, ``rediss://``; Redis 6 or newer), on redis-py.

Data model, per task (the hash tag keeps a task's keys in one cluster slot)::

    sheri:task:{<swarm>/<task_id>}:hold   <holder>                  PX <lease>
    sheri:task:{<swarm>/<task_id>}:rec    hash attempt, holder, released ("0"/"1"),
                                          outcome (JSON, once finished)   PX <retention>

A claim is ``SET hold <holder> NX PX <lease>``; it runs inside a Lua script (so
atomically) that first reads the record: the finished, stale, same-attempt and
not-released cases are decided there. Renew, assert, release and finish are
compare-and-act scripts on the same two keys. The lease is judged by Redis's clock
(key expiry). Per leadership name::

    sheri:leader:{<swarm>/<name>}:term    "<epoch> <holder>"         PX <lease>
    sheri:leader:{<swarm>/<name>}:epoch   the last epoch given (never expires)

redis-py's ``Script`` runs them with EVALSHA and loads them again after a restart
(NOSCRIPT). A Redis restarted empty forgets holds, records and epochs: holders
:meth:`~RedisStore.assert_hold`, takeover still needs the holder dead in presence, and
candidates pass the epoch they know (``known_epoch``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, cast

import redis
import redis.exceptions as rex
from redis.backoff import NoBackoff
from redis.retry import Retry

from ._api import (
    Hold,
    Leadership,
    StoreAuthError,
    StoreConfigError,
    StoredOutcome,
    StoreError,
    StoreKind,
    Verdict,
    check_attempt,
    check_lease,
    encode_outcome,
)
from ._threaded import DEFAULT_THREADS, ThreadedStore

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from ._api import ClaimRequest
    from ._config import StoreConfig

__all__ = ["RedisStore"]

DEFAULT_RETENTION: Final = 7 * 24 * 3600.0
_TIMEOUT: Final = 5.0

# Every task script reads the record first: rec[1] attempt, rec[2] holder, rec[3] released
# ("1"), rec[4] the outcome (nil until finished).
_RECORD: Final = """
local rec = redis.call('HMGET', KEYS[1], 'attempt', 'holder', 'released', 'outcome')
"""

# assert_hold's and finish's rule (ARGV: attempt, holder): the record, if any, is of this
# attempt and holder, not released, and no other holder holds the task
_MAY_HOLD: Final = """
local cur = tonumber(rec[1]) or 0
if cur ~= 0 and (cur ~= tonumber(ARGV[1]) or rec[2] ~= ARGV[2] or rec[3] == '1') then
  return 0
end
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= ARGV[2] then return 0 end
"""

# KEYS: rec, hold. ARGV: attempt, holder, lease_ms, retention_ms, takeover ("1"/"0")
_CLAIM: Final = (
    _RECORD
    + """
local n = tonumber(ARGV[1])
local h = ARGV[2]
if rec[4] then return 'finished' end
local cur = tonumber(rec[1]) or 0
if cur > 0 then
  if n < cur then return 'stale' end
  if n == cur then
    if rec[2] ~= h or rec[3] == '1' then return 'lost' end
    local owner = redis.call('GET', KEYS[2])
    if owner and owner ~= h then return 'lost' end
    redis.call('SET', KEYS[2], h, 'PX', ARGV[3])
    return 'won'
  end
  if rec[3] ~= '1' and ARGV[5] ~= '1' then return 'held' end
end
if not redis.call('SET', KEYS[2], h, 'NX', 'PX', ARGV[3]) then return 'held' end
redis.call('HSET', KEYS[1], 'attempt', ARGV[1], 'holder', h, 'released', '0')
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 'won'
"""
)

# KEYS: rec, hold. ARGV: attempt, holder, lease_ms, retention_ms
_RENEW: Final = (
    _RECORD
    + """
if rec[4] or tonumber(rec[1]) ~= tonumber(ARGV[1]) or rec[2] ~= ARGV[2] or rec[3] == '1' then
  return 0
end
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""
)

# KEYS: rec, hold. ARGV: attempt, holder, lease_ms, retention_ms
_ASSERT: Final = (
    _RECORD
    + """
if rec[4] then return 0 end
"""
    + _MAY_HOLD
    + """
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('HSET', KEYS[1], 'attempt', ARGV[1], 'holder', ARGV[2], 'released', '0')
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""
)

# KEYS: rec, hold. ARGV: attempt, holder, retention_ms
_RELEASE: Final = (
    _RECORD
    + """
if rec[4] or tonumber(rec[1]) ~= tonumber(ARGV[1]) or rec[2] ~= ARGV[2] then return 0 end
if rec[3] ~= '1' then
  redis.call('HSET', KEYS[1], 'released', '1')
  if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
)

# KEYS: rec, hold. ARGV: attempt, holder, outcome JSON, retention_ms
_FINISH: Final = (
    _RECORD
    + """
if rec[4] then
  if tonumber(rec[1]) == tonumber(ARGV[1]) and rec[2] == ARGV[2] then return 1 end
  return 0
end
"""
    + _MAY_HOLD
    + """
redis.call('HSET', KEYS[1], 'attempt', ARGV[1], 'holder', ARGV[2], 'released', '0',
           'outcome', ARGV[3])
redis.call('DEL', KEYS[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""
)

# KEYS: rec, hold. -> {attempt, holder, released, finished, live} or false
_READ: Final = (
    _RECORD
    + """
if not rec[1] then return false end
local finished = 0
if rec[4] then finished = 1 end
return {rec[1], rec[2], rec[3], finished, redis.call('EXISTS', KEYS[2])}
"""
)

# KEYS: term, epoch. ARGV: holder, lease_ms, known_epoch -> epoch, or -1
_ACQUIRE: Final = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local sep = string.find(cur, ' ', 1, true)
  if string.sub(cur, sep + 1) ~= ARGV[1] then return -1 end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(string.sub(cur, 1, sep - 1))
end
local e = math.max(tonumber(redis.call('GET', KEYS[2])) or 0, tonumber(ARGV[3])) + 1
redis.call('SET', KEYS[2], string.format('%d', e))
redis.call('SET', KEYS[1], string.format('%d', e) .. ' ' .. ARGV[1], 'PX', ARGV[2])
return e
"""

# KEYS: term. ARGV: "<epoch> <holder>", lease_ms
_RENEW_LEADER: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: term. ARGV: "<epoch> <holder>"
_RELEASE_LEADER: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

_MIN_VERSION: Final = (6, 0)
#: a batch whose claim script the server does not have (NOSCRIPT) loads it and sends the
#: rest again at most this often
_SCRIPT_LOADS: Final = 2
_Args = list[str | int]


def _ms(seconds: float) -> int:
    return max(1, round(check_lease(seconds) * 1000))


class RedisStore(ThreadedStore):
    """A claim store in Redis. Open it with :func:`~sheri_trio.stores.open_store`."""

    def __init__(
        self,
        config: StoreConfig,
        swarm: str,
        *,
        threads: int = DEFAULT_THREADS,
        retention: float = DEFAULT_RETENTION,
    ) -> None:
        super().__init__(config, swarm, threads=threads)
        if config.kind != "redis":
            raise StoreConfigError(f"not a Redis URL: {config.url}")
        self._retention_ms = _ms(retention)
        tls = config.tls
        self._client = redis.Redis(
            host=config.host,
            port=config.port,
            db=int(config.database or 0),
            username=config.username,
            password=config.password,
            ssl=config.use_tls,
            ssl_ca_certs=str(tls.ca_file) if tls.ca_file else None,
            ssl_certfile=str(tls.cert_file) if tls.cert_file else None,
            ssl_keyfile=str(tls.key_file) if tls.key_file else None,
            ssl_cert_reqs="none" if tls.insecure else "required",
            ssl_check_hostname=config.use_tls and not tls.insecure,
            socket_timeout=_TIMEOUT,
            socket_connect_timeout=_TIMEOUT,
            # one retry on a fresh connection: a pooled one is dead after a restart
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[rex.ConnectionError],
            max_connections=threads,
            decode_responses=True,
            client_name="sheri-claims",
        )
        self._claim = self._client.register_script(_CLAIM)
        self._renew = self._client.register_script(_RENEW)
        self._assert = self._client.register_script(_ASSERT)
        self._release = self._client.register_script(_RELEASE)
        self._finish = self._client.register_script(_FINISH)
        self._read = self._client.register_script(_READ)
        self._acquire = self._client.register_script(_ACQUIRE)
        self._renew_leader = self._client.register_script(_RENEW_LEADER)
        self._release_leader = self._client.register_script(_RELEASE_LEADER)

    @property
    def kind(self) -> StoreKind:
        return "redis"

    # -- keys --------------------------------------------------------------

    def _task_keys(self, task_id: str) -> list[str]:
        base = f"sheri:task:{{{self._swarm}/{task_id}}}"
        return [f"{base}:rec", f"{base}:hold"]

    def _leader_keys(self, name: str) -> list[str]:
        base = f"sheri:leader:{{{self._swarm}/{name}}}"
        return [f"{base}:term", f"{base}:epoch"]

    # -- errors ------------------------------------------------------------

    def _map_error(self, exc: Exception, *, opening: bool) -> StoreError | None:
        if not isinstance(exc, rex.RedisError):
            return None
        message = self._config.redact(str(exc))
        if isinstance(exc, rex.NoPermissionError) or message.startswith("NOPERM"):
            return StoreAuthError(f"claim store {self.url} denies the user access: {message}")
        if isinstance(exc, rex.AuthenticationError | rex.AuthorizationError) or message.startswith(
            ("NOAUTH", "WRONGPASS")
        ):
            return StoreAuthError(f"claim store {self.url} refused the credentials: {message}")
        if isinstance(exc, rex.BusyLoadingError | rex.ReadOnlyError):
            return self._unavailable("not ready for writes", exc, opening=opening)
        if isinstance(exc, rex.ConnectionError | rex.TimeoutError):
            return self._unavailable("connection", exc, opening=opening)
        return StoreError(f"claim store {self.url}: {message}")

    # -- opening -------------------------------------------------------------

    async def open(self) -> None:
        """Connect and check the server (version 6 or newer); map failures to our errors."""

        def check() -> None:
            try:
                info = cast("dict[str, object]", self._client.info("server"))
            except rex.NoPermissionError:  # an ACL user for the claims only: no INFO
                self._client.ping()
                return
            version = str(info.get("redis_version", "0"))
            numbers = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
            if numbers < _MIN_VERSION:
                raise StoreConfigError(
                    f"claim store {self.url} runs Redis {version}: 6.0 or newer is needed"
                )

        await self._call(check, opening=True)

    async def ping(self) -> None:
        await self._call(self._client.ping)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._client.connection_pool.disconnect()  # closes sockets only: does not block

    # -- tasks -------------------------------------------------------------

    def _claim_args(self, attempt: int, holder: str, lease: float, takeover: bool) -> _Args:
        """The claim script's ARGV: attempt, holder, lease_ms, retention_ms, takeover."""
        return [attempt, holder, _ms(lease), self._retention_ms, "1" if takeover else "0"]

    async def _claim_or_takeover(
        self, task_id: str, attempt: int, holder: str, lease: float, takeover: bool
    ) -> Verdict:
        args = self._claim_args(attempt, holder, lease, takeover)
        keys = self._task_keys(task_id)
        answer = await self._call(lambda: self._claim(keys=keys, args=args))
        return Verdict(answer)

    def _claim_batch(self, requests: Sequence[ClaimRequest]) -> list[Verdict]:
        """One pipeline (no MULTI) of the claim script by its SHA (EVALSHA): one round
        trip, the scripts run in order (each atomic). A server without the script (it
        restarted, SCRIPT FLUSH) answers NOSCRIPT: the script is loaded and the requests
        from the first refused one on are sent again (those before it were carried out).
        redis-py's own pipelined scripts would ask SCRIPT EXISTS first: a round trip more."""
        calls = [  # KEYS (2) then ARGV, as _CLAIM takes them
            [
                *self._task_keys(r.task_id),
                *map(str, self._claim_args(r.attempt, r.holder, r.lease, r.takeover)),
            ]
            for r in requests
        ]
        sha = self._claim.sha
        verdicts: list[Verdict] = []
        loads = 0
        while True:
            pipe = self._client.pipeline(transaction=False)
            for call in calls[len(verdicts) :]:
                pipe.evalsha(sha, 2, *call)
            answers: list[object] = pipe.execute(raise_on_error=False)  # type: ignore[no-untyped-call,unused-ignore]
            for answer in answers:
                if isinstance(answer, rex.NoScriptError) and loads < _SCRIPT_LOADS:
                    break
                if isinstance(answer, Exception):
                    raise answer
                verdicts.append(Verdict(answer))
            else:
                return verdicts
            loads += 1
            self._client.script_load(_CLAIM)

    async def renew(self, task_id: str, attempt: int, holder: str, lease: float) -> bool:
        check_attempt(attempt)
        keys = self._task_keys(task_id)
        args: _Args = [attempt, holder, _ms(lease), self._retention_ms]
        return bool(await self._call(lambda: self._renew(keys=keys, args=args)))

    async def assert_hold(self, task_id: str, attempt: int, holder: str, lease: float) -> bool:
        check_attempt(attempt)
        keys = self._task_keys(task_id)
        args: _Args = [attempt, holder, _ms(lease), self._retention_ms]
        return bool(await self._call(lambda: self._assert(keys=keys, args=args)))

    async def release(self, task_id: str, attempt: int, holder: str) -> bool:
        check_attempt(attempt)
        keys = self._task_keys(task_id)
        args: _Args = [attempt, holder, self._retention_ms]
        return bool(await self._call(lambda: self._release(keys=keys, args=args)))

    async def finish(
        self, task_id: str, attempt: int, holder: str, outcome: Mapping[str, object]
    ) -> bool:
        check_attempt(attempt)
        data = encode_outcome(outcome).decode()
        keys = self._task_keys(task_id)
        args: _Args = [attempt, holder, data, self._retention_ms]
        return bool(await self._call(lambda: self._finish(keys=keys, args=args)))

    async def outcome(self, task_id: str) -> StoredOutcome | None:
        rec_key = self._task_keys(task_id)[0]

        def read() -> list[str | None]:
            return cast(
                "list[str | None]", self._client.hmget(rec_key, ["attempt", "holder", "outcome"])
            )

        attempt, holder, data = await self._call(read)
        if attempt is None or holder is None or data is None:
            return None
        return StoredOutcome.decode(task_id, attempt, holder, data)

    async def hold(self, task_id: str) -> Hold | None:
        keys = self._task_keys(task_id)
        found = await self._call(lambda: self._read(keys=keys))
        if not found:
            return None
        attempt, holder, released, finished, live = found
        return Hold(task_id, int(attempt), str(holder), released == "1", bool(live), bool(finished))

    # -- leadership ----------------------------------------------------------

    async def acquire_leader(
        self, name: str, holder: str, lease: float, *, known_epoch: int = 0
    ) -> Leadership | None:
        keys = self._leader_keys(name)
        args: _Args = [holder, _ms(lease), max(0, known_epoch)]
        epoch = int(await self._call(lambda: self._acquire(keys=keys, args=args)))
        return None if epoch < 0 else Leadership(name, holder, epoch)

    async def renew_leader(self, term: Leadership, lease: float) -> bool:
        keys = self._leader_keys(term.name)[:1]
        args: _Args = [f"{term.epoch} {term.holder}", _ms(lease)]
        return bool(await self._call(lambda: self._renew_leader(keys=keys, args=args)))

    async def release_leader(self, term: Leadership) -> bool:
        keys = self._leader_keys(term.name)[:1]
        args: _Args = [f"{term.epoch} {term.holder}"]
        return bool(await self._call(lambda: self._release_leader(keys=keys, args=args)))

    async def leader(self, name: str) -> Leadership | None:
        key = self._leader_keys(name)[0]
        value = await self._call(lambda: cast("str | None", self._client.get(key)))
        if value is None:
            return None
        epoch, _, holder = value.partition(" ")
        return Leadership(name, holder, int(epoch))
