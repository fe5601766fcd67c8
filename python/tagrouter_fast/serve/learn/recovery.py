"""The recovery layer of `OutcomeStore`: opening a state directory. The manifest names the
snapshot (checked by sha256), the registry file and the decisions logs since it rebuild the
registry, and the journal after it is replayed under strict rules: sequence numbers without
gaps up to the ACKED watermark; a torn, never-acknowledged tail is cut with a warning; anything
else stops the start with a `StateError` naming the file, the byte offset and how to recover.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from tagrouter_fast import journal
from tagrouter_fast.core import Record, TagScorer
from tagrouter_fast.serve.learn.registry import _check_decision_fields, _Decision
from tagrouter_fast.serve.learn.snapshots import Snapshots, _Cut
from tagrouter_fast.serve.learn.state import (
    _DECISIONS_RE,
    _JOURNAL_RE,
    _REGISTRY_RE,
    _STORE_RE,
    ACKED,
    LOCK_FILE,
    MANIFEST,
    OUTCOME_LABELS,
    QUERY_ID_PREFIX,
    STATE_FORMAT,
    STATE_VERSION,
    OutcomeStoreError,
    StateError,
    _cut,
    _numbered,
    _scan,
    fsync,
    log,
)

try:  # POSIX; without it two processes on one state dir are not detected (documented)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class Recovery(Snapshots):
    """The recovery layer: the directory lock, then the state read back."""

    # ---- open / recover ----

    def _take_dir_lock(self) -> None:
        self._lock_fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            return
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise OutcomeStoreError(
                f"{self.state_dir} is in use by another outcome store (another gateway process?)"
            ) from None

    def _open(self, check_base: bool) -> None:
        d = self.state_dir
        base = self.router.scorer.to_bytes()
        base_sha = hashlib.sha256(base).hexdigest()
        self._base_sha256 = base_sha
        manifest_path = d / MANIFEST
        segments = _numbered(d, _JOURNAL_RE)
        acked = self._read_acked()
        if not manifest_path.is_file():
            if segments or _numbered(d, _REGISTRY_RE) or acked:
                raise StateError(
                    f"{d}: journal, registry or {ACKED} files without {MANIFEST}; the state "
                    "directory is damaged (restore the manifest, or move the directory away to "
                    "start over)"
                )
            # A fresh directory pins the router's current store as generation 0, so a restart
            # replays onto exactly the store these outcomes were counted on.
            self._snap_seq = 0
            self._persist(_Cut(0, 0, 0, self.router.scorer, []))
            segments = []
            manifest: dict[str, Any] = {"generation": 0, "seq": 0, "store_version": 0,
                                        "registry": None}  # fmt: skip
        else:
            manifest = self._read_manifest(manifest_path)
            if check_base and manifest["base_sha256"] != base_sha:
                raise StateError(
                    f"{manifest_path}: this state was started on another store than the "
                    "router's (the bundle changed); its snapshot would replace the new store. "
                    "Move the state directory away to start over, or pass check_base=False to "
                    "keep the learned store"
                )
            self._base_sha256 = manifest["base_sha256"]
            store_path = d / manifest["store"]
            try:
                data = store_path.read_bytes()
            except OSError as e:
                raise StateError(
                    f"{manifest_path}: cannot read its snapshot {store_path}: {e}"
                ) from e
            if hashlib.sha256(data).hexdigest() != manifest["store_sha256"]:
                raise StateError(f"{store_path}: does not match the sha256 in {manifest_path}")
            try:
                scorer = TagScorer.from_bytes(data)
                self.router.swap_store(scorer)
            except Exception as e:
                raise StateError(f"{store_path}: cannot be routed with: {e}") from e
        gen, snap_seq = int(manifest["generation"]), int(manifest["seq"])
        self._generation, self._snap_seq = gen, snap_seq
        evicted = manifest.get("evicted_t", 0.0)  # absent in manifests written before tokens
        self._evicted_t = float(evicted) if isinstance(evicted, (int, float)) else 0.0
        now = self._clock()

        if acked is None and self._durable and manifest_path.is_file() and segments:
            log.warning(
                "%s: no %s watermark (a state directory of an older version, or it was deleted "
                "to accept a loss): this start cannot tell whether acknowledged outcomes at the "
                "end of the journal are missing", d, ACKED,
            )
        self._load_registry(manifest.get("registry"), gen)
        records, last_seq = self._replay_journal(segments, snap_seq, acked)
        if records:
            try:
                self._learn(records)
            except Exception as e:
                raise StateError(
                    f"{d}: replaying {len(records)} journal entries failed: {e}"
                ) from e

        # Trim the registry to its bounds (the logs are unordered across files).
        for did in [k for k, v in self._registry.items() if v.t + self._ttl <= now]:
            del self._registry[did]
        self._evict_over_max_locked()

        self._next_seq = last_seq + 1
        self._synced_seq = self._applied_seq = last_seq
        self.version = int(manifest["store_version"]) + len(records)
        # Append to the last journal segment if it fits the sequence, else start one.
        if segments and (segments[-1][1].stat().st_size > 0 or segments[-1][0] == self._next_seq):
            jpath = segments[-1][1]
        else:
            if segments:
                segments[-1][1].unlink()  # empty and misnamed: nothing in it
            jpath = d / f"journal-{self._next_seq:012d}.log"
        self._journal_fd = journal.open_append(jpath)
        self._journal_bytes = jpath.stat().st_size
        if self._durable:
            # What the journal holds now is counted: it is the new floor. Durable before the
            # first acknowledgement, like the journal segment's name (one directory fsync).
            self._acked = journal.Watermark(d / ACKED)
            self._acked.write({"acked": last_seq})
            self._acked.sync(fsync=fsync)
            self._acked_written = self._acked_synced = last_seq
            journal.fsync_dir(d, fsync=fsync)
        existing = [g for g, _ in _numbered(d, _DECISIONS_RE)]
        dgen = max([gen, *existing])
        self._decisions_fd = journal.open_append(d / f"decisions-{dgen:08d}.log")
        self._next_generation = max([dgen, *(g for g, _ in _numbered(d, _STORE_RE))]) + 1
        for tmp in d.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)  # a write that a crash interrupted
        self._compact(gen, snap_seq)

    def _read_acked(self) -> int | None:
        """The ACKED watermark, or None when there is none to check against (missing, or a torn
        write: it only ever helps to detect a loss, so its own loss is a warning)."""
        path = self.state_dir / ACKED
        try:
            rec = journal.Watermark.read(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"{path}: cannot read: {e}") from e
        value = rec.get("acked") if rec is not None else None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            log.warning("%s: unreadable (a torn write?); this start cannot tell whether "
                        "acknowledged outcomes at the end of the journal are missing", path)
            return None
        return value

    def _load_registry(self, dump: str | None, gen: int) -> None:
        """The snapshot's registry file, then the decisions logs written since it."""
        d = self.state_dir
        if dump:
            for where, obj in self._lines(d / dump, strict=True, last=False):
                did, tags, model, t = _check_decision_fields(obj, where)
                self._registry[did] = _Decision(tags, model, t, -1 if obj.get("done") else 0)
        decision_logs = [(g, p) for g, p in _numbered(d, _DECISIONS_RE) if g >= gen]
        for i, (_, path) in enumerate(decision_logs):
            last = i == len(decision_logs) - 1
            lines, good = _scan(path, strict=False, last=last)
            for lineno, obj in lines:
                try:
                    did, tags, model, t = _check_decision_fields(obj, f"{path}:{lineno}")
                except StateError as e:
                    log.warning("skipping: %s", e)
                    continue
                self._registry.setdefault(did, _Decision(tags, model, t))
            if last and good < path.stat().st_size:
                _cut(path, good, durable=False)

    def _replay_journal(
        self, segments: list[tuple[int, Path]], snap_seq: int, acked: int | None
    ) -> tuple[list[Record], int]:
        """The records of every journal entry after the snapshot (marking their decisions) and
        the last sequence number seen.

        Entries must be strictly consecutive, from at most ``snap_seq + 1`` up to at least
        ``acked`` (the ACKED watermark; None when there is none to check against). A bad line
        followed by good ones is damage inside the journal. A bad *last* line of a segment is
        cut, with a warning, when the sequence numbers show that it held nothing acknowledged:
        the next segment goes on from the line before it (a failed append leaves its seq to the
        next line), or it ends the journal at or after ``acked``. Anything else stops the
        start with one line naming the file, the byte offset and how to recover; nothing is
        cut before every check passed, so a refused start leaves the files as they were.
        """
        records: list[Record] = []
        last_seq = snap_seq
        expect: int | None = None
        replayed: set[str] = set()
        torn: list[tuple[Path, journal.Line]] = []  # bad last lines, cut once all checks pass
        # The last segment, and the offset where its good part ends.
        end: tuple[Path | None, int] = (None, 0)
        for first, path in segments:
            try:
                lines = journal.scan(path)
            except OSError as e:
                raise StateError(f"{path}: cannot read: {e}") from e
            if lines and lines[-1].payload is None:
                torn.append((path, lines[-1]))
                lines = lines[:-1]
            for k, line in enumerate(lines):
                if line.payload is None:
                    raise StateError(
                        f"{path}:{line.number}: corrupt line at byte {line.offset} (checksum or "
                        f"JSON does not match) with {len(lines) - k} more lines after it: the "
                        "journal is damaged before its end and the outcomes from there on "
                        "cannot be trusted. To recover: restore the file from a backup, or "
                        + self._accept_loss(path, line.offset, segments)
                    )
            for n, line in enumerate(lines):
                obj = line.payload
                assert obj is not None
                where = f"{path}:{line.number}"
                seq, label = obj.get("seq"), obj.get("outcome")
                did, tags, model, t = _check_decision_fields(obj, where)
                if not isinstance(seq, int) or label not in OUTCOME_LABELS:
                    raise StateError(f"{where}: bad seq or outcome in {obj!r}")
                if n == 0 and seq != first:
                    raise StateError(
                        f"{where}: first entry has seq {seq}, the file name says {first}"
                    )
                if expect is None:
                    if seq > snap_seq + 1:
                        raise StateError(
                            f"{where}: journal entries {snap_seq + 1}..{seq - 1} after the "
                            f"snapshot of {MANIFEST} are missing: they were acknowledged. To "
                            "recover: restore the journal files from a backup, or "
                            + self._accept_loss(path, 0, segments)
                        )
                elif seq != expect:
                    prev = end[0]
                    hint = ""
                    if torn and prev is not None and torn[-1][0] == prev:
                        hint = f" ({prev.name} ends in a damaged line at byte {torn[-1][1].offset})"
                    raise StateError(
                        f"{where}: seq {seq} follows {expect - 1}: entries are missing or "
                        f"reordered{hint}, and outcomes {expect}..{seq - 1} were acknowledged. "
                        "To recover: restore the journal files from a backup, or "
                        + self._accept_loss(path, line.offset, segments)
                    )
                expect = seq + 1
                last_seq = max(last_seq, seq)
                if seq <= snap_seq:
                    continue  # in the snapshot already
                if did in replayed:
                    raise StateError(f"{where}: a second outcome for decision {did!r}")
                replayed.add(did)
                dec = self._registry.get(did)
                if dec is None:
                    dec = self._registry[did] = _Decision(tags, model, t)
                elif dec.seq != 0:
                    raise StateError(
                        f"{where}: decision {did!r} has an outcome after the snapshot, but the "
                        "snapshot's registry says it had one before"
                    )
                dec.seq, dec.applied = seq, True
                records.append((QUERY_ID_PREFIX + did, list(tags), model, label))
            end = (path, lines[-1].end if lines else 0)
        if acked is not None and acked > last_seq:
            last_path, offset = end
            if last_path is None:
                what = f"{self.state_dir}: no journal file holds them"
            elif torn and torn[-1][0] == last_path:
                what = f"{last_path}: ends in a damaged line at byte {offset}"
            elif offset == 0:
                what = f"{last_path}: is empty"
            else:
                what = f"{last_path}: ends at byte {offset} with seq {last_seq}"
            raise StateError(
                f"{what}, but {ACKED} says outcomes up to seq {acked} were acknowledged: "
                f"outcomes {last_seq + 1}..{acked} are lost (a journal cut, emptied, deleted or "
                "damaged at its end). To recover: restore the journal files from a backup, or "
                f"delete {self.state_dir / ACKED} to start without them"
            )
        for path, line in torn:
            _cut(path, line.offset, durable=self._durable)
        return records, last_seq

    def _accept_loss(self, path: Path, offset: int, segments: list[tuple[int, Path]]) -> str:
        """How to start without the outcomes from ``offset`` of ``path`` on (one line)."""
        later = [p.name for _, p in segments if p.name > path.name]
        steps = [f"truncate -s {offset} {path}" if offset else f"rm {path}"]
        if later:
            steps.append(f"remove the later journal files ({', '.join(later)})")
        steps.append(f"rm {self.state_dir / ACKED}")
        return "to start without those outcomes: " + "; ".join(steps)

    def _lines(self, path: Path, *, strict: bool, last: bool) -> list[tuple[str, dict[str, Any]]]:
        try:
            lines, good = _scan(path, strict=strict, last=last)
        except OSError as e:
            raise StateError(f"{path}: cannot read: {e}") from e
        if good < path.stat().st_size:
            raise StateError(f"{path}: truncated last line (the file is written atomically)")
        return [(f"{path}:{n}", obj) for n, obj in lines]

    def _read_manifest(self, path: Path) -> dict[str, Any]:
        try:
            m = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StateError(f"{path}: unreadable ({e})") from e
        if not isinstance(m, dict) or m.get("format") != STATE_FORMAT:
            raise StateError(f"{path}: not a {STATE_FORMAT} manifest")
        if m.get("version") != STATE_VERSION:
            raise StateError(
                f"{path}: state version {m.get('version')!r}, this version reads {STATE_VERSION}"
            )
        for key, kind in (("generation", int), ("seq", int), ("store_version", int),
                          ("store", str), ("store_sha256", str), ("base_sha256", str)):  # fmt: skip
            if not isinstance(m.get(key), kind) or isinstance(m.get(key), bool):
                raise StateError(f"{path}: {key!r} missing or not a {kind.__name__}")
        for key in ("store", "registry"):
            name = m.get(key)
            if name is not None and (not isinstance(name, str) or Path(name).name != name):
                raise StateError(f"{path}: {key!r} must be a file name in the directory")
        return m

