-- What a claim's commit costs (issue 18). A claim writes a container, a
-- claim and an event; every index is one more page for the commit to
-- write and sync, and every check one more step for the writer thread,
-- which all claims go through one after another.
--
-- 1. The event log keeps the two lookups that are rare in a big log, a
-- tenant's events and a kind's; a node's or a workload's are frequent
-- enough to find by reading back from the newest, and the trim finds old
-- events by id, the log's order (store/events.rs). A claim's commit
-- wrote fourteen pages, seven of them for its event; now eleven.
--
-- 2. SQLite evaluates `x IN ('a', 'b', 'c')` with more than two values by
-- building a temporary index of them, for each row written: three such
-- checks (the container's state, the claim's status, the event's
-- severity) were a seventh of a claim's time in the writer. The same
-- checks as comparisons cost next to nothing. SQLite cannot alter a check, and rebuilding
-- these tables would copy every row at upgrade; a check is only text in
-- the schema, which SQLite documents may be edited in place for a
-- change that leaves every stored row as valid as before
-- (https://www.sqlite.org/lang_altertable.html#otheralter): these are
-- the same sets of values, written out. Where a text does not match (a
-- schema not made by these migrations), nothing changes and the check
-- stays as it was, correct and slower.
PRAGMA writable_schema = ON;
UPDATE sqlite_schema
SET sql = replace(sql,
    'CHECK (state IN (''warming'', ''idle'', ''claimed'', ''reserved'', ''draining'', ''lost''))',
    'CHECK (state = ''warming'' OR state = ''idle'' OR state = ''claimed'' OR state = ''reserved'' OR state = ''draining'' OR state = ''lost'')')
WHERE type = 'table' AND name = 'containers';
UPDATE sqlite_schema
SET sql = replace(sql,
    'CHECK (status IN (''active'', ''released'', ''lost''))',
    'CHECK (status = ''active'' OR status = ''released'' OR status = ''lost'')')
WHERE type = 'table' AND name = 'claims';
UPDATE sqlite_schema
SET sql = replace(sql,
    'CHECK (severity IN (''info'', ''warning'', ''error''))',
    'CHECK (severity = ''info'' OR severity = ''warning'' OR severity = ''error'')')
WHERE type = 'table' AND name = 'events';
-- Reloads this connection's schema; the index changes below change the
-- schema's version, so every other connection reloads it too.
PRAGMA writable_schema = RESET;

DROP INDEX events_by_at;
DROP INDEX events_by_workload;
DROP INDEX events_by_node;
